// The early-exit cascade over a loaded bundle with any onnxruntime JavaScript API (onnxruntime-web in a browser,
// onnxruntime-node in tests): level 0, then each finer level only while the gate is not met, feeding the previous
// level's present.* outputs back as past_key_values.* inputs (the KV cache never leaves the runtime's tensors).

import { embeddingOutputName, pastNames, patchInputName, presentNames } from "./bundle.js";

const now = () => globalThis.performance.now();

/** Softmax probabilities of the head: logits = logit_scale * embedding . weight[c] + bias[c] (float64). */
export function headProbabilities(bundle, embedding) {
  const { headWeight, headBias } = bundle;
  const n = headBias.length, d = embedding.length;
  const scale = bundle.manifest.head.logit_scale;
  const logits = new Float64Array(n);
  let max = -Infinity;
  for (let c = 0; c < n; c++) {
    let dot = 0;
    const row = c * d;
    for (let i = 0; i < d; i++) dot += embedding[i] * headWeight[row + i];
    logits[c] = scale * dot + headBias[c];
    if (logits[c] > max) max = logits[c];
  }
  let sum = 0;
  for (let c = 0; c < n; c++) sum += (logits[c] = Math.exp(logits[c] - max));
  for (let c = 0; c < n; c++) logits[c] /= sum;
  return logits;
}

/** Top-1 minus top-2 probability (1 with a single class). */
export function softmaxMargin(probs) {
  let p1 = -Infinity, p2 = -Infinity;
  for (const p of probs) {
    if (p > p1) [p1, p2] = [p, p1];
    else if (p > p2) p2 = p;
  }
  return probs.length < 2 ? 1 : p1 - p2;
}

export class Cascade {
  /**
   * Create one inference session per level graph. The graphs keep their large initializers in the bundle's one
   * external-data file (manifest.external_data), handed to every session from memory.
   */
  static async create(ort, bundle, { executionProviders = ["wasm"], sessionOptions = {} } = {}) {
    const m = bundle.manifest;
    const options = { ...sessionOptions, executionProviders };
    if (m.external_data) options.externalData = [{ path: m.external_data.file, data: bundle.files.get(m.external_data.file) }];
    const sessions = [];
    for (const level of m.levels) sessions.push(await ort.InferenceSession.create(bundle.files.get(level.file), options));
    return new Cascade(ort, bundle, sessions, executionProviders);
  }

  constructor(ort, bundle, sessions, executionProviders) {
    this.ort = ort;
    this.bundle = bundle;
    this.sessions = sessions;
    this.executionProviders = executionProviders;
    const m = bundle.manifest;
    this.thresholds = [...m.gate.thresholds];
    this.present = presentNames(m);
  }

  get numLevels() {
    return this.sessions.length;
  }

  /**
   * Run the cascade on one image's per-level patches (Float32Array per level).
   * options: thresholds (one per level before the last; default the manifest's), maxLevel, topK, onLevel(k, info).
   */
  async classify(levels, { thresholds = this.thresholds, maxLevel = this.numLevels - 1, topK = 5, onLevel } = {}) {
    const m = this.bundle.manifest;
    if (thresholds.length !== this.numLevels - 1) throw new Error(`need ${this.numLevels - 1} thresholds`);
    const levelMs = [], levelMargins = [];
    let past = null, probs = null, margin = 0, k = 0;
    for (; k <= maxLevel; k++) {
      const t0 = now();
      const spec = m.preprocessing.levels[k];
      const feeds = { [patchInputName(m, k)]: new this.ort.Tensor("float32", levels[k], [1, spec.tokens, spec.values_per_token]) };
      pastNames(m, k).forEach((name, i) => { feeds[name] = past[i]; });
      const out = await this.sessions[k].run(feeds);
      probs = headProbabilities(this.bundle, out[embeddingOutputName(m, k)].data);
      margin = softmaxMargin(probs);
      levelMargins.push(margin);
      const exit = k === maxLevel || margin >= thresholds[k];
      past = exit ? null : this.present.map((name) => out[name]);
      levelMs.push(now() - t0);
      if (onLevel) onLevel(k, { margin, ms: levelMs[k], exit });
      if (exit) break;
    }
    const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]).slice(0, topK);
    const head = m.head;
    return {
      label: head.labels[order[0]],
      class_name: head.class_names[order[0]],
      score: probs[order[0]],
      margin,
      exit_level: k,
      top_k: order.map((c) => ({ class_name: head.class_names[c], label: head.labels[c], score: probs[c] })),
      level_ms: levelMs,
      level_margins: levelMargins,
    };
  }

  /**
   * Milliseconds of each level graph alone (session.run, no head or gate), `runs` times after one warm-up, fed the
   * real KV cache of the levels before it.
   */
  async timeLevels(levels, runs) {
    const m = this.bundle.manifest;
    const feeds = [];
    let past = null;
    for (let k = 0; k < this.numLevels; k++) {
      const spec = m.preprocessing.levels[k];
      const f = { [patchInputName(m, k)]: new this.ort.Tensor("float32", levels[k], [1, spec.tokens, spec.values_per_token]) };
      pastNames(m, k).forEach((name, i) => { f[name] = past[i]; });
      feeds.push(f);
      const out = await this.sessions[k].run(f);
      past = this.present.map((name) => out[name]);
    }
    const times = [];
    for (let k = 0; k < this.numLevels; k++) {
      const t = [];
      for (let i = 0; i <= runs; i++) {
        const t0 = now();
        await this.sessions[k].run(feeds[k]);
        if (i) t.push(now() - t0);
      }
      times.push(t);
    }
    return times;
  }

  /** Run every level once on zeros, so that the first image's ms per level are not the one-off kernel set-up. */
  async warmUp() {
    const zeros = this.bundle.manifest.preprocessing.levels.map((l) => new Float32Array(l.tokens * l.values_per_token));
    await this.classify(zeros, { thresholds: this.thresholds.map(() => Infinity) });
  }

  async release() {
    for (const s of this.sessions) await s.release?.();
  }
}
