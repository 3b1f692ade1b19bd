// Independent JavaScript implementation of hllm.abtest.assignment, checked against the committed vectors.
//
//   node tests/abtest/vectors/check_vectors.mjs [path/to/assignment.json]
//
// Uses only Node's built-in crypto. Exits 0 when every vector matches, 1 on any mismatch (each one is
// printed), 2 when the file cannot be read or holds no vectors. Spec (see hllm/abtest/assignment.py):
//   digest = SHA-256(UTF-8(salt) || 0x1F || UTF-8(unit_id)); bucket = uint64_be(digest[0:8]) mod 10000
//   in_experiment = start <= bucket(layer) < end && bucket(exposure_salt) < round(exposure * 10000)
//   arm = bucket(arm_salt) < round(split * 10000) ? "challenger" : "champion"   (null when not in it)

import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const BUCKETS = 10000n;
const path = process.argv[2] ?? fileURLToPath(new URL("./assignment.json", import.meta.url));

function utf8(text) {
  // Buffer.from would silently turn a lone surrogate into U+FFFD; the Python side refuses those ids.
  if (!text.isWellFormed()) throw new Error(`not well-formed UTF-16: ${JSON.stringify(text)}`);
  return Buffer.from(text, "utf8");
}

function digest(salt, unitId) {
  return createHash("sha256").update(Buffer.concat([utf8(salt), Buffer.from([0x1f]), utf8(unitId)])).digest();
}

function bucketOf(raw) {
  return Number(raw.readBigUInt64BE(0) % BUCKETS);
}

function shareToBuckets(share) {
  const count = Math.round(share * 10000);
  if (Math.abs(share * 10000 - count) > 1e-6) throw new Error(`share not a multiple of 1/10000: ${share}`);
  return count;
}

function assign(exp, unitId) {
  const exposureDigest = digest(exp.exposure_salt, unitId);
  const layerBucket = bucketOf(digest(exp.layer, unitId));
  const exposureBucket = bucketOf(exposureDigest);
  const armBucket = bucketOf(digest(exp.arm_salt, unitId));
  const [start, end] = exp.layer_range ?? [0, 10000];
  const inExperiment = start <= layerBucket && layerBucket < end && exposureBucket < shareToBuckets(exp.exposure);
  const arm = inExperiment ? (armBucket < shareToBuckets(exp.split) ? "challenger" : "champion") : null;
  return {
    unit_hash: exposureDigest.toString("hex"),
    layer_bucket: layerBucket,
    exposure_bucket: exposureBucket,
    arm_bucket: armBucket,
    in_experiment: inExperiment,
    arm,
    model_version: arm === "challenger" ? exp.challenger_version : exp.champion_version,
  };
}

const failures = [];
function expectEqual(what, actual, expected) {
  if (actual !== expected) failures.push(`${what}: got ${JSON.stringify(actual)}, expected ${JSON.stringify(expected)}`);
}

let data;
try {
  data = JSON.parse(readFileSync(path, "utf8"));
} catch (err) {
  console.error(`cannot read ${path}: ${err.message}`);
  process.exit(2);
}
const hashes = data.hashes ?? [];
const assignments = data.assignments ?? [];
if (hashes.length === 0 || assignments.length === 0) {
  console.error(`${path}: no vectors`);
  process.exit(2);
}

expectEqual("buckets", BigInt(data.buckets), BUCKETS);
for (const d of data.default_salts ?? []) {
  expectEqual(`default exposure salt of ${d.experiment_id}`, `exp:${d.experiment_id}:exposure`, d.exposure_salt);
  expectEqual(`default arm salt of ${d.experiment_id}`, `exp:${d.experiment_id}:arm`, d.arm_salt);
}

hashes.forEach((v, i) => {
  const label = `hashes[${i}] (salt ${JSON.stringify(v.salt)}, id ${JSON.stringify(v.unit_id)})`;
  const raw = digest(v.salt, v.unit_id);
  expectEqual(`${label} utf8`, utf8(v.unit_id).toString("hex"), v.unit_id_utf8_hex);
  expectEqual(`${label} input`, Buffer.concat([utf8(v.salt), Buffer.from([0x1f]), utf8(v.unit_id)]).toString("hex"),
    v.input_hex);
  expectEqual(`${label} sha256`, raw.toString("hex"), v.sha256);
  expectEqual(`${label} bucket`, bucketOf(raw), v.bucket);
});

const experiments = new Map((data.experiments ?? []).map((e) => [e.experiment_id, e]));
assignments.forEach((v, i) => {
  const exp = experiments.get(v.experiment_id);
  const label = `assignments[${i}] (${v.experiment_id}, id ${JSON.stringify(v.unit_id)})`;
  if (exp === undefined) {
    failures.push(`${label}: unknown experiment`);
    return;
  }
  expectEqual(`${label} utf8`, utf8(v.unit_id).toString("hex"), v.unit_id_utf8_hex);
  const got = assign(exp, v.unit_id);
  for (const [key, value] of Object.entries(got)) expectEqual(`${label} ${key}`, value, v[key]);
});

if (failures.length > 0) {
  for (const f of failures) console.error(`MISMATCH ${f}`);
  console.error(`${failures.length} mismatches in ${path}`);
  process.exit(1);
}
console.log(`ok: ${hashes.length} hash vectors, ${assignments.length} assignment vectors match (${path})`);
