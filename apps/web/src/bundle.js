// Read a WaveCLIP bundle (manifest.json + level graphs + head arrays) through a reader, check the manifest's
// contract and every file's sha256 (SubtleCrypto, in browsers and Node alike).

import { RESAMPLE_NAMES } from "./resample.js";
import { COLOR_TRANSFORMS } from "./preprocess.js";

export const MANIFEST = "manifest.json";
export const BUNDLE_FORMAT = "waveclip-edge/bundle";
export const BUNDLE_FORMAT_VERSION = 1;
// The one patch order this app implements (manifest.preprocessing.patch_order).
export const PATCH_ORDER = "token (row-major over grid) x [channel (Y,Cb,Cr), band, row, col]";

/** A bundle that cannot be used; its message is one line meant for the user. */
export class BundleError extends Error {
  constructor(message) {
    super(message);
    this.name = "BundleError";
  }
}

/** A reader over a bundle folder at a URL (fetch). */
export function urlReader(baseUrl) {
  const base = new URL(baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`, globalThis.location?.href);
  return {
    where: base.href,
    async bytes(name) {
      let response;
      try {
        response = await fetch(new URL(name, base));
      } catch (e) {
        throw new BundleError(`${name}: cannot fetch from ${base.href} (${e.message})`);
      }
      if (!response.ok) throw new BundleError(`${name}: missing from the bundle (HTTP ${response.status})`);
      return new Uint8Array(await response.arrayBuffer());
    },
  };
}

/** A reader over files the user picked (an <input webkitdirectory> FileList or dropped files), by base name. */
export function fileListReader(files) {
  const byName = new Map([...files].map((f) => [f.name, f]));
  return {
    where: "the chosen folder",
    async bytes(name) {
      const file = byName.get(name.split("/").pop());
      if (!file) throw new BundleError(`${name}: missing from the chosen folder`);
      return new Uint8Array(await file.arrayBuffer());
    },
  };
}

export function hex(buffer) {
  return [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function need(condition, message) {
  if (!condition) throw new BundleError(`manifest.json: ${message}`);
}

/** Check the parts of the manifest this app relies on; throws BundleError with the first problem found. */
export function checkManifest(m) {
  need(m && typeof m === "object" && m.format === BUNDLE_FORMAT, "not a waveclip-edge bundle manifest");
  need(m.format_version === BUNDLE_FORMAT_VERSION,
       `bundle format version ${JSON.stringify(m.format_version)} is not supported (this app reads version ${BUNDLE_FORMAT_VERSION})`);
  need((m.graph_format ?? "onnx") === "onnx",
       `graph format "${m.graph_format}" is not supported: the browser runs ONNX bundles (this one needs the Python runtime)`);
  for (const key of ["model", "preprocessing", "kv_cache", "levels", "head", "gate", "files"]) {
    need(m[key] && typeof m[key] === "object", `missing "${key}"`);
  }
  const p = m.preprocessing;
  for (const key of ["image_size", "resample", "crop", "color", "normalize", "wavelet", "dwt_mode", "dwt_levels", "grid", "levels"]) {
    need(p[key] !== undefined, `preprocessing has no "${key}"`);
  }
  need(RESAMPLE_NAMES.includes(p.resample), `resample "${p.resample}" is not one of ${RESAMPLE_NAMES.join(", ")}`);
  need(p.crop === "center", `crop "${p.crop}" is not supported`);
  need(p.color in COLOR_TRANSFORMS, `colour transform "${p.color}" is not supported`);
  need(p.wavelet === "haar" && p.dwt_mode === "periodization", `wavelet ${p.wavelet}/${p.dwt_mode} is not supported`);
  need(p.patch_order === undefined || p.patch_order === PATCH_ORDER, `patch order "${p.patch_order}" is not supported`);
  need(Array.isArray(m.levels) && m.levels.length >= 1 && p.levels.length === m.levels.length,
       `${m.levels.length} level graphs but ${p.levels.length} preprocessing levels`);
  m.levels.forEach((level, k) => {
    need(level.level === k, `levels[${k}] says level ${level.level}`);
    need(typeof level.file === "string" && level.file in m.files, `${level.file} has no sha256 in "files"`);
    const shape = inputPatchShape(m, k);
    need(shape[1] === p.levels[k].tokens && shape[2] === p.levels[k].values_per_token,
         `level ${k} graph input ${JSON.stringify(shape)} does not match its preprocessing level`);
  });
  const thresholds = m.gate.thresholds;
  need(m.gate.metric === "softmax_margin", `gate metric "${m.gate.metric}" is not supported`);
  need(Array.isArray(thresholds) && thresholds.length === m.levels.length - 1,
       `the gate needs ${m.levels.length - 1} thresholds (one per level before the last)`);
  for (const part of ["weight", "bias"]) {
    const spec = m.head[part];
    need(spec && spec.dtype === "float32" && spec.file in m.files, `head ${part} must be a float32 file listed in "files"`);
  }
  need(m.head.weight.shape.length === 2 && m.head.weight.shape[0] === m.head.class_names.length &&
       m.head.bias.shape[0] === m.head.class_names.length && m.head.labels.length === m.head.class_names.length,
       "head weight, bias, labels and class names disagree on the number of classes");
  if (m.external_data) need(m.external_data.file in m.files, `${m.external_data.file} has no sha256 in "files"`);
}

/** Name of the graph input that takes the patches (the one that is not a KV cache input). */
export function patchInputName(m, k) {
  const past = new Set(pastNames(m, k));
  return m.levels[k].inputs.map((t) => t.name).find((n) => !past.has(n));
}

export function inputPatchShape(m, k) {
  const name = patchInputName(m, k);
  return m.levels[k].inputs.find((t) => t.name === name).shape;
}

function kvName(pattern, layer) {
  return pattern.replace("%d", String(layer));
}

/** KV cache input names of level k (key, value per layer), empty for level 0. */
export function pastNames(m, k) {
  if (!k) return [];
  const kv = m.kv_cache;
  return Array.from({ length: kv.num_layers }, (_, i) => [kvName(kv.past_key_pattern, i), kvName(kv.past_value_pattern, i)]).flat();
}

/** KV cache output names of a level, in the same order as pastNames. */
export function presentNames(m) {
  const kv = m.kv_cache;
  return Array.from({ length: kv.num_layers }, (_, i) => [kvName(kv.present_key_pattern, i), kvName(kv.present_value_pattern, i)]).flat();
}

/** The embedding output of level k (the one that is not a KV cache output). */
export function embeddingOutputName(m, k) {
  const present = new Set(presentNames(m));
  return m.levels[k].outputs.map((t) => t.name).find((n) => !present.has(n));
}

function float32Array(bytes, spec, name) {
  const count = spec.shape.reduce((a, b) => a * b, 1);
  if (bytes.byteLength !== count * 4) {
    throw new BundleError(`${name}: holds ${bytes.byteLength} bytes, manifest says float32 ${JSON.stringify(spec.shape)}`);
  }
  const out = new Float32Array(count);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < count; i++) out[i] = view.getFloat32(i * 4, true); // little-endian by contract
  return out;
}

/**
 * Load and check a bundle. `reader.bytes(name)` returns a file's bytes. With `verify`, every file listed in the
 * manifest is checked against its sha256 before anything runs.
 * @returns {Promise<{manifest: object, files: Map<string, Uint8Array>, headWeight: Float32Array, headBias: Float32Array, where: string}>}
 */
export async function loadBundle(reader, { verify = true, onProgress = () => {} } = {}) {
  let manifest;
  const text = new TextDecoder().decode(await reader.bytes(MANIFEST));
  try {
    manifest = JSON.parse(text);
  } catch (e) {
    throw new BundleError(`manifest.json: not valid JSON (${e.message})`);
  }
  checkManifest(manifest);
  const subtle = globalThis.crypto?.subtle;
  if (verify && !subtle) {
    throw new BundleError("cannot verify the bundle: SubtleCrypto needs a secure context (https or localhost)");
  }
  const files = new Map();
  const names = Object.keys(manifest.files);
  for (const [i, name] of names.entries()) {
    onProgress(`reading ${name} (${i + 1}/${names.length})`);
    const bytes = await reader.bytes(name);
    if (verify) {
      const digest = hex(await subtle.digest("SHA-256", bytes));
      if (digest !== manifest.files[name]) {
        throw new BundleError(`${name} does not match its sha256 in the manifest (tampered or corrupt bundle)`);
      }
    }
    files.set(name, bytes);
  }
  const head = manifest.head;
  return {
    manifest,
    files,
    headWeight: float32Array(files.get(head.weight.file), head.weight, head.weight.file),
    headBias: float32Array(files.get(head.bias.file), head.bias, head.bias.file),
    where: reader.where,
  };
}
