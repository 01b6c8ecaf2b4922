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
   * Create the sessions. `weights`: "auto" (default) runs the bundle's split graphs when it has them (each level's
   * small embedding graph and ONE body for every level: the weights once in memory, and for an int8 bundle the same
   * quantized body the Python runtime runs by default), "levels" one session per level graph, "split" the split
   * graphs or an error. The graphs keep their large initializers in the bundle's one external-data file
   * (manifest.external_data), handed to every session from memory.
   */
  static async create(ort, bundle, { executionProviders = ["wasm"], sessionOptions = {}, weights = "auto" } = {}) {
    const m = bundle.manifest;
    if (!["auto", "levels", "split"].includes(weights)) {
      throw new Error(`weights "${weights}": choose auto, levels or split`);
    }
    if (weights === "split" && !m.split) {
      throw new Error("this bundle has no split graphs (export it without --no-split)");
    }
    const options = { ...sessionOptions, executionProviders };
    if (m.external_data) {
      options.externalData = [{ path: m.external_data.file, data: bundle.files.get(m.external_data.file) }];
    }
    const open = (file) => ort.InferenceSession.create(bundle.files.get(file), options);
    if (m.split && weights !== "levels") {
      const embeds = [];
      for (const e of m.split.embed) embeds.push(await open(e.file));
      const body = await open(m.split.body.file);
      return new Cascade(ort, bundle, m.levels.map(() => body), executionProviders, embeds);
    }
    const sessions = [];
    for (const level of m.levels) sessions.push(await open(level.file));
    return new Cascade(ort, bundle, sessions, executionProviders);
  }

  constructor(ort, bundle, sessions, executionProviders, embeds = null) {
    this.ort = ort;
    this.bundle = bundle;
    this.sessions = sessions;
    this.embeds = embeds;
    this.executionProviders = executionProviders;
    const m = bundle.manifest;
    this.thresholds = [...m.gate.thresholds];
    this.present = presentNames(m);
  }

  /** The inputs of level k's graph for one image: its patches (split: the tokens of its embedding graph, the level
   * index and, at level 0, an empty KV cache) and `past`, the previous level's present tensors. */
  async levelFeeds(k, patches, past) {
    const m = this.bundle.manifest;
    const spec = m.preprocessing.levels[k];
    const tensor = new this.ort.Tensor("float32", patches, [1, spec.tokens, spec.values_per_token]);
    if (!this.embeds) {
      const feeds = { [patchInputName(m, k)]: tensor };
      pastNames(m, k).forEach((name, i) => { feeds[name] = past[i]; });
      return feeds;
    }
    const embed = this.embeds[k];
    const tokens = (await embed.run({ [embed.inputNames[0]]: tensor }))[embed.outputNames[0]];
    const feeds = { level: new this.ort.Tensor("int64", BigInt64Array.from([BigInt(k)]), []), tokens };
    const kv = m.kv_cache;
    const empty = () => new this.ort.Tensor("float32", new Float32Array(0), [1, kv.num_heads, 0, kv.head_dim]);
    pastNames(m, 1).forEach((name, i) => { feeds[name] = k ? past[i] : empty(); });
    return feeds;
  }

  /** The embedding output of level k's session (the output that is not a KV cache). */
  embeddingName(k) {
    return this.embeds ? this.sessions[k].outputNames.find((n) => !this.present.includes(n))
      : embeddingOutputName(this.bundle.manifest, k);
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
      const out = await this.sessions[k].run(await this.levelFeeds(k, levels[k], past));
      probs = headProbabilities(this.bundle, out[this.embeddingName(k)].data);
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
   * Milliseconds of each level graph alone (session.run, no head or gate; split: the body, its tokens computed
   * once before), `runs` times after one warm-up, fed the real KV cache of the levels before it.
   */
  async timeLevels(levels, runs) {
    const feeds = [];
    let past = null;
    for (let k = 0; k < this.numLevels; k++) {
      const f = await this.levelFeeds(k, levels[k], past);
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
    for (const s of new Set([...this.sessions, ...(this.embeds ?? [])])) await s.release?.();
  }
}
