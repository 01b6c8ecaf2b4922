#!/usr/bin/env node
// Drive the page in headless Chromium (puppeteer-core over the system browser) for tests/test_web.py and bench/.
//
//   node test/browser.js --chromium PATH --url http://127.0.0.1:PORT/apps/web/ --cases cases.json --out out.json
//
// cases.json: [{"name", "query": "?ep=wasm" (optional), "screenshot": "x.png" (optional),
//               "bundle_files": [folder] (optional: then choose this folder in the page's bundle picker),
//               "uploads": [{"name", "file", "screenshot" (optional), "bench": N (optional)}] (optional)}]
// Each case opens the page once and reads what it shows after loading; then each upload chooses a file in the
// page's file input, as a user would, and reads what the page shows then: state, label, exit level, margin,
// message, and the model's input crop. "bench": time every level N times on that image, all levels forced.
// out.json: one entry per case and per upload, by name.

import { readFile, writeFile } from "node:fs/promises";
import { parseArgs } from "node:util";

import puppeteer from "puppeteer-core";

const { values: args } = parseArgs({
  options: { chromium: { type: "string" }, url: { type: "string" }, cases: { type: "string" }, out: { type: "string" },
             timeout: { type: "string", default: "300000" } },
});
for (const key of ["chromium", "url", "cases", "out"]) {
  if (!args[key]) {
    console.error(`error: --${key} is required`);
    process.exit(2);
  }
}
const timeout = Number(args.timeout);

async function bundleSettled(page, previousLoads) {
  await page.waitForFunction((n) => Number(document.body.dataset.bundles) > n, { timeout, polling: 50 }, previousLoads);
}

async function settled(page, previousRun) {
  // The page sets body[data-state] to ready | done | error (and body[data-run] after each image).
  await page.waitForFunction((run) => {
    const { state, run: done } = document.body.dataset;
    if (run === null) return state === "ready" || state === "error";
    return (state === "done" || state === "error") && Number(done) > run;
  }, { timeout, polling: 50 }, previousRun);
}

async function readPage(page) {
  return page.evaluate(() => {
    const app = window.__waveclip || {};
    const text = (id) => document.getElementById(id)?.textContent ?? "";
    return {
      state: document.body.dataset.state,
      message: document.getElementById("message").hidden ? "" : text("message"),
      bundle_status: text("bundle-status"),
      bundle_name: text("bundle-name"),
      label: document.getElementById("label").dataset.label || null,
      class_name: text("label") || null,
      exit_level: text("exit-level") === "" ? null : Number(text("exit-level")),
      margin: text("margin") === "" ? null : Number(text("margin")),
      result_visible: !document.getElementById("result").hidden,
      visible_text_chars: document.body.innerText.trim().length,
      result: app.result ?? null,
      crop: app.crop ? Array.from(app.crop) : null,
      providers: app.providers ?? [],
    };
  });
}

const cases = JSON.parse(await readFile(args.cases, "utf8"));
const browser = await puppeteer.launch({
  executablePath: args.chromium,
  headless: true,
  // root in containers needs --no-sandbox; the page is served from 127.0.0.1 only
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking"],
});
const outputs = [];
try {
  for (const c of cases) {
    const page = await browser.newPage();
    await page.setViewport({ width: 1000, height: 820 });
    const log = [];
    page.on("console", (msg) => log.push(`${msg.type()}: ${msg.text()}`));
    page.on("pageerror", (err) => log.push(`pageerror: ${err.message}`));
    const t0 = Date.now();
    await page.goto(new URL(c.query || "", args.url).href, { waitUntil: "load", timeout });
    await settled(page, null);
    if (c.bundle_files) {
      await (await page.$("#bundle-input")).uploadFile(...c.bundle_files);
      await bundleSettled(page, 1);
    }
    outputs.push({ name: c.name, load_ms: Date.now() - t0, ...(await readPage(page)), console: [...log] });
    if (c.screenshot) await page.screenshot({ path: c.screenshot, fullPage: true });
    for (const [i, upload] of (c.uploads || []).entries()) {
      const input = await page.$("#image-input");
      await input.uploadFile(upload.file);
      await settled(page, i);
      const out = { name: upload.name, ...(await readPage(page)), console: [...log] };
      if (upload.bench && out.state === "done") {
        out.bench = await page.evaluate((n) => window.__waveclip.bench(n), upload.bench);
      }
      if (upload.screenshot) await page.screenshot({ path: upload.screenshot, fullPage: true });
      outputs.push(out);
    }
    await page.close();
  }
} finally {
  await browser.close();
}
await writeFile(args.out, JSON.stringify(outputs, null, 1));
console.log(`${outputs.length} cases -> ${args.out}`);
