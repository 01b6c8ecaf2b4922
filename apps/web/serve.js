#!/usr/bin/env node
// A static file server for the page, on 127.0.0.1 only. It sends the cross-origin isolation headers (COOP/COEP)
// that multi-threaded WASM needs; any static server works otherwise (python -m http.server: one WASM thread).
//
//   node apps/web/serve.js [--root DIR (default: the repository root)] [--port N (default 8013; 0: any free)]
//                          [--mount /prefix/=DIR ...]   then open http://127.0.0.1:PORT/apps/web/

import { createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { extname, join, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const TYPES = {
  ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
  ".json": "application/json", ".wasm": "application/wasm", ".png": "image/png", ".jpg": "image/jpeg",
  ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp", ".svg": "image/svg+xml", ".txt": "text/plain",
};

const { values: args } = parseArgs({
  options: { root: { type: "string" }, port: { type: "string", default: "8013" }, mount: { type: "string", multiple: true, default: [] } },
});
const root = resolve(args.root ?? fileURLToPath(new URL("../..", import.meta.url)));
const mounts = args.mount.map((m) => {
  const [prefix, dir] = m.split("=");
  return [prefix.endsWith("/") ? prefix : `${prefix}/`, resolve(dir)];
});

function locate(urlPath) {
  let path;
  try {
    path = decodeURIComponent(urlPath);
  } catch {
    return null;
  }
  let base = root, rest = path;
  for (const [prefix, dir] of mounts) {
    if (path.startsWith(prefix)) [base, rest] = [dir, path.slice(prefix.length)];
  }
  const file = resolve(join(base, rest));
  if (file !== base && !file.startsWith(base + sep)) return null; // no way out of the served folders
  try {
    const stat = statSync(file);
    if (stat.isDirectory()) return locate(`${urlPath.replace(/\/?$/, "/")}index.html`);
    return stat.isFile() ? { file, size: stat.size } : null;
  } catch {
    return null;
  }
}

const server = createServer((req, res) => {
  res.setHeader("Cross-Origin-Opener-Policy", "same-origin");
  res.setHeader("Cross-Origin-Embedder-Policy", "require-corp");
  res.setHeader("Cache-Control", "no-store");
  if (req.method !== "GET" && req.method !== "HEAD") {
    res.writeHead(405).end();
    return;
  }
  const found = locate(new URL(req.url, "http://localhost").pathname);
  if (!found) {
    res.writeHead(404, { "Content-Type": "text/plain" }).end("not found\n");
    return;
  }
  res.writeHead(200, { "Content-Type": TYPES[extname(found.file).toLowerCase()] ?? "application/octet-stream",
                       "Content-Length": found.size });
  if (req.method === "HEAD") res.end();
  else createReadStream(found.file).pipe(res);
});

server.listen(Number(args.port), "127.0.0.1", () => {
  const { port } = server.address();
  console.log(`serving ${root} at http://127.0.0.1:${port}/apps/web/`);
});
