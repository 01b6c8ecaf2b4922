// The manifest's preprocessing in plain JavaScript: resize the shorter side, centre crop, YCbCr, normalisation,
// multi-scale Haar DWT and per-level patches. Every size, band and order comes from manifest.preprocessing; the only
// numbers here are those that define the named standards (BT.601 luma weights, the Haar filter).
//
// Arithmetic is float32 (Math.fround) in the order the reference implementation uses, so the patches match it to
// float32 rounding, not just approximately.

import { resizeRGB } from "./resample.js";

const f32 = Math.fround;

/** RGB -> YCbCr matrices by the manifest's `color` names, derived from each standard's luma weights. */
export const COLOR_TRANSFORMS = {
  // ITU-R BT.601 luma weights, full range (JPEG/JFIF, ITU-T T.871): chroma centred on 128 for 8-bit input.
  ycbcr_bt601_full: ycbcrFromLumaWeights(0.299, 0.114, 128),
};

function ycbcrFromLumaWeights(kr, kb, chromaOffset) {
  const kg = 1 - kr - kb;
  const cb = 2 * (1 - kb), cr = 2 * (1 - kr);
  return {
    matrix: [[kr, kg, kb], [-kr / cb, -kg / cb, 0.5], [0.5, -kg / cr, -kb / cr]],
    offset: [0, chromaOffset, chromaOffset],
  };
}

/** Python's round(): ties to even. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x - Math.trunc(x)) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * Resize the shorter side to spec.resize_shorter (default spec.image_size) with spec.resample, then centre-crop
 * spec.image_size. `rgb`: packed RGB Uint8Array of width*height*3. Returns Uint8Array [size, size, 3].
 */
export function resizeCenterCrop(rgb, width, height, spec) {
  if (!(width > 0 && height > 0)) throw new Error(`zero-sized image (${width}x${height})`);
  if (rgb.length !== width * height * 3) throw new Error(`expected ${width * height * 3} RGB bytes, got ${rgb.length}`);
  const size = spec.image_size;
  const shorter = spec.resize_shorter || size;
  const scale = shorter / Math.min(width, height);
  const nw = Math.max(shorter, roundHalfEven(width * scale));
  const nh = Math.max(shorter, roundHalfEven(height * scale));
  const resized = resizeRGB(rgb, width, height, nw, nh, spec.resample || "bicubic");
  const left = Math.floor((nw - size) / 2), top = Math.floor((nh - size) / 2);
  const out = new Uint8Array(size * size * 3); // pixels outside the resized image stay 0, as in a Pillow crop
  for (let y = 0; y < size; y++) {
    const sy = y + top;
    if (sy < 0 || sy >= nh) continue;
    for (let x = 0; x < size; x++) {
      const sx = x + left;
      if (sx < 0 || sx >= nw) continue;
      const s = (sy * nw + sx) * 3, o = (y * size + x) * 3;
      out[o] = resized[s];
      out[o + 1] = resized[s + 1];
      out[o + 2] = resized[s + 2];
    }
  }
  return out;
}

/** Square RGB [S, S, 3] -> three planes [S*S] float32: YCbCr * normalize.scale + normalize.offset. */
export function toColorPlanes(rgb, spec) {
  const transform = COLOR_TRANSFORMS[spec.color];
  if (!transform) throw new Error(`unsupported colour transform "${spec.color}"`);
  const n = spec.image_size * spec.image_size;
  const scale = f32(spec.normalize.scale), offset = f32(spec.normalize.offset);
  const planes = [];
  for (let c = 0; c < 3; c++) {
    const [m0, m1, m2] = transform.matrix[c].map((v) => f32(f32(v) * scale));
    const bias = f32(f32(f32(transform.offset[c]) * scale) + offset);
    const plane = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      const p = i * 3;
      plane[i] = f32(f32(f32(f32(rgb[p] * m0) + f32(rgb[p + 1] * m1)) + f32(rgb[p + 2] * m2)) + bias);
    }
    planes.push(plane);
  }
  return planes;
}

/**
 * One orthonormal 2D Haar step (periodization; even sides) of a size x size plane.
 * Returns {LL, LH, HL, HH} of (size/2)^2: the first letter is the filter along x, the second along y
 * (LH: horizontal edges, PyWavelets' cH; HL: vertical edges, cV; HH: diagonal, cD).
 */
export function haarStep(plane, size) {
  if (size % 2) throw new Error(`Haar DWT needs even sides, got ${size}`);
  const h = size / 2, n = h * h;
  const LL = new Float32Array(n), LH = new Float32Array(n), HL = new Float32Array(n), HH = new Float32Array(n);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < h; x++) {
      const i = 2 * y * size + 2 * x;
      const a = plane[i], b = plane[i + 1], c = plane[i + size], d = plane[i + size + 1];
      const sumL = f32(a + c), sumR = f32(b + d), diffL = f32(a - c), diffR = f32(b - d);
      const o = y * h + x;
      LL[o] = f32(f32(sumL + sumR) * 0.5);
      LH[o] = f32(f32(diffL + diffR) * 0.5);
      HL[o] = f32(f32(sumL - sumR) * 0.5);
      HH[o] = f32(f32(diffL - diffR) * 0.5);
    }
  }
  return { LL, LH, HL, HH };
}

/** Every band of a `levels`-scale decomposition by name ("LL3", "LH1", ...), each {data, size}. */
export function haarBands(plane, size, levels) {
  const bands = new Map();
  let ll = plane, s = size;
  for (let j = 1; j <= levels; j++) {
    const step = haarStep(ll, s);
    s /= 2;
    for (const kind of ["LH", "HL", "HH"]) bands.set(`${kind}${j}`, { data: step[kind], size: s });
    ll = step.LL;
    bands.set(`LL${j}`, { data: ll, size: s });
  }
  return bands;
}

/**
 * Square RGB [S, S, 3] -> per-level patches, one Float32Array [tokens * values_per_token] per manifest level:
 * tokens row-major over the grid (the level's own where it has one), values ordered channel (Y, Cb, Cr), band (as
 * listed), row, col.
 */
export function rgbToLevels(rgb, spec) {
  const size = spec.image_size;
  if (rgb.length !== size * size * 3) throw new Error(`expected a ${size}x${size} RGB image`);
  if (spec.wavelet !== "haar" || spec.dwt_mode !== "periodization") {
    throw new Error(`unsupported wavelet "${spec.wavelet}" / mode "${spec.dwt_mode}"`);
  }
  const channels = toColorPlanes(rgb, spec).map((p) => haarBands(p, size, spec.dwt_levels));
  return spec.levels.map((level, k) => {
    const p = level.patch_size, grid = level.grid ?? spec.grid;
    const bands = level.bands.map((name) => {
      const band = channels[0].get(name);
      if (!band) throw new Error(`level ${k}: unknown band "${name}" for a ${spec.dwt_levels}-scale DWT`);
      if (band.size !== level.band_size || p * grid !== band.size) {
        throw new Error(`level ${k}: band ${name} is ${band.size}px, manifest says ${level.band_size} / patch ${p}`);
      }
      return name;
    });
    const values = channels.length * bands.length * p * p;
    if (values !== level.values_per_token || grid * grid !== level.tokens) {
      throw new Error(`level ${k}: ${grid * grid} tokens of ${values} values, manifest says ` +
                      `${level.tokens} of ${level.values_per_token}`);
    }
    const out = new Float32Array(grid * grid * values);
    let o = 0;
    for (let gy = 0; gy < grid; gy++) {
      for (let gx = 0; gx < grid; gx++) {
        for (const bandsOfChannel of channels) {
          for (const name of bands) {
            const { data, size: bs } = bandsOfChannel.get(name);
            for (let y = 0; y < p; y++) {
              const row = (gy * p + y) * bs + gx * p;
              for (let x = 0; x < p; x++) out[o++] = data[row + x];
            }
          }
        }
      }
    }
    return out;
  });
}

/** Decoded RGB of any size -> {crop: Uint8Array [S,S,3], levels: Float32Array[]} following the manifest spec. */
export function preprocessRGB(rgb, width, height, spec) {
  const crop = resizeCenterCrop(rgb, width, height, spec);
  return { crop, levels: rgbToLevels(crop, spec) };
}
