#!/usr/bin/env node
// Parity driver for tests/test_web.py: decoded RGB images in, the JS module's crops, per-level patches and cascade
// results out (raw little-endian files + results.json), for the Python side to compare with runtime's.
//
//   node test/parity.js --bundle DIR --pixels rgb.bin --index index.json --out DIR [--resample NAME] [--no-cascade]
//       [--weights auto|levels|split]
//
// index.json: [{"name": str, "width": int, "height": int, "offset": int}, ...] (offsets into rgb.bin, packed RGB).

import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";

import { preprocessRGB } from "../src/preprocess.js";
import { openBundle, fsReader } from "../src/node.js";
import { loadBundle } from "../src/bundle.js";

const { values: args } = parseArgs({
  options: {
    bundle: { type: "string" }, pixels: { type: "string" }, index: { type: "string" }, out: { type: "string" },
    resample: { type: "string" }, "no-cascade": { type: "boolean", default: false },
    threads: { type: "string" }, weights: { type: "string", default: "auto" },
  },
});
for (const key of ["bundle", "pixels", "index", "out"]) {
  if (!args[key]) {
    console.error(`error: --${key} is required`);
    process.exit(2);
  }
}

const cascadeWanted = !args["no-cascade"];
const { bundle, cascade } = cascadeWanted
  ? await openBundle(args.bundle, { threads: args.threads ? Number(args.threads) : undefined, weights: args.weights })
  : { bundle: await loadBundle(fsReader(args.bundle)), cascade: null };
const spec = { ...bundle.manifest.preprocessing };
if (args.resample) spec.resample = args.resample;

const pixels = await readFile(args.pixels);
const index = JSON.parse(await readFile(args.index, "utf8"));
const crops = [], levelChunks = spec.levels.map(() => []), results = [];
for (const item of index) {
  const rgb = new Uint8Array(pixels.buffer, pixels.byteOffset + item.offset, item.width * item.height * 3);
  const { crop, levels } = preprocessRGB(rgb, item.width, item.height, spec);
  crops.push(crop);
  if (!cascadeWanted) continue;
  levels.forEach((lv, k) => levelChunks[k].push(new Uint8Array(lv.buffer)));
  results.push({ name: item.name, ...(await cascade.classify(levels)) });
}
await mkdir(args.out, { recursive: true });
await writeFile(join(args.out, "crops.bin"), Buffer.concat(crops));
if (cascadeWanted) {
  for (const [k, chunks] of levelChunks.entries()) await writeFile(join(args.out, `level${k}.bin`), Buffer.concat(chunks));
  await writeFile(join(args.out, "results.json"), JSON.stringify(results));
}
console.log(`${index.length} images -> ${args.out}`);
