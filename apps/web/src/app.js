// The page: load a bundle (URL or a chosen folder), decode a dropped or chosen image, run the cascade with
// onnxruntime-web (WebGPU when the browser has an adapter, else WASM) and show what happened at each level.
//
// Query parameters: bundle=URL (default: the shipped demo bundle), image=URL (classify on load), ep=wasm|webgpu,
// threads=N (WASM threads; more than 1 needs a cross-origin isolated page, as serve.js gives), maxPixels=N,
// verify=0 (skip the sha256 check).

import * as ort from "../node_modules/onnxruntime-web/dist/ort.min.mjs";

import { BundleError, fileListReader, loadBundle, urlReader } from "./bundle.js";
import { Cascade } from "./cascade.js";
import { preprocessRGB } from "./preprocess.js";

const DEFAULT_BUNDLE = "../../models/waveclip-demo/bundle/";
const DEFAULT_MAX_PIXELS = 40e6; // this page's decode limit: larger images are refused before decoding

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const app = { cascade: null, runs: 0, bundleLoads: 0, result: null, crop: null, error: null, providers: [] };
window.__waveclip = app; // read by the browser test and the benchmark

class ImageError extends Error {}

function setState(state) {
  document.body.dataset.state = state;
}

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
  if (kind === "error") app.error = text;
}

function describe(error) {
  return error instanceof BundleError || error instanceof ImageError ? error.message : `${error.name}: ${error.message}`;
}

async function chooseProviders() {
  const wanted = params.get("ep");
  if (wanted === "wasm") return ["wasm"];
  try {
    if (navigator.gpu && (await navigator.gpu.requestAdapter())) return ["webgpu", "wasm"];
  } catch { /* no usable adapter */ }
  if (wanted === "webgpu") showMessage("WebGPU is not available in this browser: using WASM.", "note");
  return ["wasm"];
}

async function openBundle(reader, label) {
  setState("loading");
  showMessage("");
  $("result").hidden = true;
  $("image-input").disabled = true;
  $("bundle-name").textContent = label;
  const status = $("bundle-status");
  try {
    const bundle = await loadBundle(reader, {
      verify: params.get("verify") !== "0",
      onProgress: (text) => { status.textContent = text; },
    });
    status.textContent = "creating inference sessions…";
    if (app.cascade) await app.cascade.release();
    app.cascade = null;
    let providers = await chooseProviders();
    const start = async () => {
      const created = await Cascade.create(ort, bundle, { executionProviders: providers });
      status.textContent = "warming up…";
      await created.warmUp();
      return created;
    };
    let cascade;
    try {
      cascade = await start();
    } catch (e) {
      if (providers[0] !== "webgpu") throw e;
      providers = ["wasm"];
      showMessage(`WebGPU failed (${e.message}): using WASM.`, "note");
      cascade = await start();
    }
    app.cascade = cascade;
    app.providers = providers;
    const m = bundle.manifest;
    $("bundle-name").textContent = `${m.name || label} (${m.precision}, ${m.levels.length} levels, ` +
      `${m.head.class_names.length} classes, ${m.preprocessing.image_size}px)`;
    status.textContent = `ready · sha256 ${params.get("verify") === "0" ? "not checked" : "verified"}`;
    $("image-input").disabled = false;
    setState("ready");
  } catch (e) {
    status.textContent = "not usable";
    showMessage(`Cannot use the bundle at ${reader.where}: ${describe(e)}`);
    setState("error");
  }
  document.body.dataset.bundles = String(++app.bundleLoads);
}

/** Decode an image Blob to packed RGB (EXIF orientation applied, alpha composited on white). */
async function decodeImage(blob, name) {
  if (blob.type && !blob.type.startsWith("image/")) {
    throw new ImageError(`${name} is not an image (its type is ${blob.type}).`);
  }
  const url = URL.createObjectURL(blob);
  const img = new Image();
  try {
    await new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = () => reject(new ImageError(`${name} is not an image this browser can decode.`));
      img.src = url;
    });
    const width = img.naturalWidth, height = img.naturalHeight;
    if (!width || !height) throw new ImageError(`${name} has no pixels.`);
    const maxPixels = Number(params.get("maxPixels")) || DEFAULT_MAX_PIXELS;
    if (width * height > maxPixels) {
      throw new ImageError(`${name} is ${width}×${height} (${(width * height / 1e6).toFixed(1)} megapixels): ` +
        `this page decodes at most ${(maxPixels / 1e6).toFixed(1)} megapixels. Please use a smaller image.`);
    }
    let bitmap;
    try {
      bitmap = await createImageBitmap(blob, { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" });
    } catch (e) {
      throw new ImageError(`${name} could not be decoded (${e.message}).`);
    }
    const canvas = document.createElement("canvas");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const rgb = new Uint8Array(canvas.width * canvas.height * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
      rgb[j] = rgba[i];
      rgb[j + 1] = rgba[i + 1];
      rgb[j + 2] = rgba[i + 2];
    }
    return { rgb, width: canvas.width, height: canvas.height, url };
  } catch (e) {
    URL.revokeObjectURL(url);
    throw e;
  }
}

function drawCrop(crop, size) {
  const canvas = $("crop");
  canvas.width = canvas.height = size;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(size, size);
  for (let i = 0, j = 0; j < crop.length; i += 4, j += 3) {
    image.data[i] = crop[j];
    image.data[i + 1] = crop[j + 1];
    image.data[i + 2] = crop[j + 2];
    image.data[i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function render(result, decoded, preMs) {
  const m = app.cascade.bundle.manifest;
  $("preview").src = decoded.url;
  $("image-size").textContent = `${decoded.width}×${decoded.height}`;
  $("crop-size").textContent = `${m.preprocessing.image_size}×${m.preprocessing.image_size} crop`;
  $("label").textContent = result.class_name;
  $("label").dataset.label = result.label;
  $("score").textContent = `${(100 * result.score).toFixed(1)}%`;
  $("exit-level").textContent = String(result.exit_level);
  $("num-levels").textContent = `0–${m.levels.length - 1}`;
  $("margin").textContent = result.margin.toFixed(4);
  const cascadeMs = result.level_ms.reduce((a, b) => a + b, 0);
  $("total-ms").textContent = `${cascadeMs.toFixed(1)} ms cascade + ${preMs.toFixed(1)} ms preprocessing`;

  const top = $("top5").tBodies[0];
  top.replaceChildren();
  for (const entry of result.top_k) {
    const row = top.insertRow();
    cell(row, entry.class_name);
    const bar = cell(row, "", "bar");
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(1, 100 * entry.score / result.top_k[0].score)}%`;
    bar.append(fill);
    cell(row, `${(100 * entry.score).toFixed(2)}%`, "num");
  }

  const levels = $("levels").tBodies[0];
  levels.replaceChildren();
  m.levels.forEach((level, k) => {
    const ran = k < result.level_ms.length;
    const row = levels.insertRow();
    row.className = ran ? (k === result.exit_level ? "exit" : "ran") : "skipped";
    cell(row, String(k));
    cell(row, level.gflops.toFixed(3), "num");
    cell(row, ran ? result.level_margins[k].toFixed(4) : "–", "num");
    cell(row, k < m.levels.length - 1 ? app.cascade.thresholds[k].toPrecision(3) : "always exits", "num");
    cell(row, ran ? result.level_ms[k].toFixed(2) : "–", "num");
    cell(row, ran ? (k === result.exit_level ? "exit" : "margin below threshold: go on") : "skipped");
  });
  const threads = ort.env.wasm.numThreads;
  $("runtime-info").textContent = `onnxruntime-web ${ort.env.versions?.web ?? ""} · ${app.providers[0]}` +
    (app.providers[0] === "wasm" ? ` · ${threads ?? "default"} thread(s)` : "") +
    ` · cross-origin isolated: ${self.crossOriginIsolated ? "yes" : "no"}`;
  $("result").hidden = false;
}

async function classifyBlob(blob, name) {
  if (!app.cascade) return;
  const run = ++app.runs;
  setState("busy");
  showMessage("");
  $("result").hidden = true;
  app.result = app.crop = app.error = null;
  try {
    const decoded = await decodeImage(blob, name);
    const t0 = performance.now();
    const { crop, levels } = preprocessRGB(decoded.rgb, decoded.width, decoded.height, app.cascade.bundle.manifest.preprocessing);
    const preMs = performance.now() - t0;
    app.levels = levels;
    app.decoded = decoded;
    const result = await app.cascade.classify(levels);
    if (run !== app.runs) return; // a newer image replaced this one
    app.result = result;
    app.crop = crop;
    drawCrop(crop, app.cascade.bundle.manifest.preprocessing.image_size);
    render(result, decoded, preMs);
    setState("done");
  } catch (e) {
    if (run !== app.runs) return;
    showMessage(describe(e));
    setState("error");
  }
  document.body.dataset.run = String(run);
}

/** Time preprocessing and every level `runs` times on the last image, all levels forced (for bench/ only). */
app.bench = async (runs) => {
  const spec = app.cascade.bundle.manifest.preprocessing;
  const thresholds = app.cascade.thresholds.map(() => Infinity);
  const perLevel = app.cascade.bundle.manifest.levels.map(() => []), preprocess = [];
  await app.cascade.classify(app.levels, { thresholds }); // warm-up
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    preprocessRGB(app.decoded.rgb, app.decoded.width, app.decoded.height, spec);
    preprocess.push(performance.now() - t0);
    const r = await app.cascade.classify(app.levels, { thresholds });
    r.level_ms.forEach((ms, k) => perLevel[k].push(ms));
  }
  const graphOnly = await app.cascade.timeLevels(app.levels, runs);
  return { providers: app.providers, threads: ort.env.wasm.numThreads ?? null, isolated: self.crossOriginIsolated,
           preprocess, perLevel, graphOnly };
};

function setupInputs() {
  $("image-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) classifyBlob(file, file.name);
  });
  $("bundle-input").addEventListener("change", (e) => {
    if (e.target.files.length) openBundle(fileListReader(e.target.files), "chosen folder");
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (!file) return showMessage("Drop an image file.");
    if (!app.cascade) return showMessage("The bundle is not loaded yet.");
    classifyBlob(file, file.name);
  });
}

async function main() {
  setupInputs();
  const threads = Number(params.get("threads"));
  if (threads > 0) ort.env.wasm.numThreads = threads;
  const bundleUrl = params.get("bundle") || DEFAULT_BUNDLE;
  await openBundle(urlReader(bundleUrl), bundleUrl);
  const imageUrl = params.get("image");
  if (imageUrl && app.cascade) {
    try {
      const response = await fetch(imageUrl);
      if (!response.ok) throw new ImageError(`${imageUrl}: HTTP ${response.status}`);
      await classifyBlob(await response.blob(), imageUrl.split("/").pop());
    } catch (e) {
      showMessage(describe(e));
      setState("error");
    }
  }
}

main();
