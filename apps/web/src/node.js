// Node entry point: the same bundle, preprocessing and cascade modules as the page, over the file system and
// onnxruntime-node (used by the parity tests).

import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { webcrypto } from "node:crypto";

import { BundleError, loadBundle } from "./bundle.js";
import { Cascade } from "./cascade.js";

if (!globalThis.crypto) globalThis.crypto = webcrypto; // Node 18 has no global Web Crypto

/** A reader over a bundle folder on disk. */
export function fsReader(folder) {
  return {
    where: folder,
    async bytes(name) {
      try {
        return new Uint8Array(await readFile(join(folder, name)));
      } catch (e) {
        throw new BundleError(`${name}: missing from ${folder} (${e.code || e.message})`);
      }
    },
  };
}

/** Load a bundle folder and create its cascade on onnxruntime-node (CPU). */
export async function openBundle(folder, { verify = true, threads, weights = "auto" } = {}) {
  const ort = await import("onnxruntime-node");
  const bundle = await loadBundle(fsReader(folder), { verify });
  const sessionOptions = threads ? { intraOpNumThreads: threads, interOpNumThreads: 1 } : {};
  const cascade = await Cascade.create(ort.default ?? ort, bundle, { executionProviders: ["cpu"], sessionOptions, weights });
  return { bundle, cascade };
}
