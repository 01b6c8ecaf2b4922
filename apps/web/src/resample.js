// Pillow-compatible resizing of 8-bit RGB images, so that a browser (or Node) feeds the level graphs the very pixels
// the Python runtime feeds them. Canvas resizing cannot do that: its filters are browser-defined and unspecified.
//
// The algorithms are those of Pillow's libImaging (Resample.c for the convolution filters, the affine "scale" path of
// Geometry.c for nearest): separable convolution, support scaled by the downscale factor (antialiasing), coefficients
// normalised then fixed to 22 fractional bits, each pass rounded and clipped to 8 bits, in Pillow 13's pass order.

const PRECISION_BITS = 32 - 8 - 2; // 8 bits of result, 2 bits of headroom for negative lobes, in a 32-bit int
const ROUND_HALF = 1 << (PRECISION_BITS - 1);

function bicubic(x) {
  // Keys' cubic convolution with a = -0.5.
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

function triangle(x) {
  if (x < 0) x = -x;
  return x < 1 ? 1.0 - x : 0.0;
}

function sinc(x) {
  if (x === 0) return 1.0;
  x *= Math.PI;
  return Math.sin(x) / x;
}

function lanczos3(x) {
  return -3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0;
}

/** Convolution filters by the manifest's `resample` names: kernel and support (in input pixels at scale 1). */
export const FILTERS = {
  bicubic: { kernel: bicubic, support: 2.0 },
  bilinear: { kernel: triangle, support: 1.0 },
  lanczos: { kernel: lanczos3, support: 3.0 },
};
export const RESAMPLE_NAMES = [...Object.keys(FILTERS), "nearest"];

/** Per output pixel: first input index, tap count and fixed-point weights (Pillow's precompute_coeffs). */
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const fixed = new Int32Array(outSize * ksize);
  const weights = new Float64Array(ksize);
  const ss = 1.0 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const count = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0.0;
    for (let x = 0; x < count; x++) {
      const w = filter.kernel((x + xmin - center + 0.5) * ss);
      weights[x] = w;
      ww += w;
    }
    for (let x = 0; x < count; x++) {
      const k = ww !== 0.0 ? weights[x] / ww : weights[x];
      fixed[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * (1 << PRECISION_BITS))
                                    : Math.trunc(0.5 + k * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = count;
  }
  return { bounds, fixed, ksize };
}

function clip8(acc) {
  const v = acc >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function horizontalPass(src, width, rowFirst, rows, outWidth, filter) {
  const { bounds, fixed, ksize } = coefficients(width, outWidth, filter);
  const out = new Uint8Array(outWidth * rows * 3);
  for (let y = 0; y < rows; y++) {
    const rowBase = (y + rowFirst) * width * 3;
    for (let xx = 0; xx < outWidth; xx++) {
      const xmin = bounds[xx * 2], count = bounds[xx * 2 + 1], kBase = xx * ksize;
      let r = ROUND_HALF, g = ROUND_HALF, b = ROUND_HALF;
      for (let x = 0; x < count; x++) {
        const k = fixed[kBase + x], p = rowBase + (xmin + x) * 3;
        r += src[p] * k;
        g += src[p + 1] * k;
        b += src[p + 2] * k;
      }
      const o = (y * outWidth + xx) * 3;
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
    }
  }
  return out;
}

function verticalPass(src, width, outHeight, coeffs) {
  const { bounds, fixed, ksize } = coeffs;
  const out = new Uint8Array(width * outHeight * 3);
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = bounds[yy * 2], count = bounds[yy * 2 + 1], kBase = yy * ksize;
    for (let x = 0; x < width; x++) {
      let r = ROUND_HALF, g = ROUND_HALF, b = ROUND_HALF;
      for (let y = 0; y < count; y++) {
        const k = fixed[kBase + y], p = ((ymin + y) * width + x) * 3;
        r += src[p] * k;
        g += src[p + 1] * k;
        b += src[p + 2] * k;
      }
      const o = (yy * width + x) * 3;
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
    }
  }
  return out;
}

function resizeNearest(src, width, height, outWidth, outHeight) {
  // Pillow's affine scale path: sample at pixel centres, coordinates accumulated in double, truncated.
  const sx = width / outWidth, sy = height / outHeight;
  const xin = new Int32Array(outWidth);
  let xo = sx * 0.5;
  for (let x = 0; x < outWidth; x++, xo += sx) xin[x] = Math.min(Math.trunc(xo), width - 1);
  const out = new Uint8Array(outWidth * outHeight * 3);
  let yo = sy * 0.5;
  for (let y = 0; y < outHeight; y++, yo += sy) {
    const row = Math.min(Math.trunc(yo), height - 1) * width;
    for (let x = 0; x < outWidth; x++) {
      const p = (row + xin[x]) * 3, o = (y * outWidth + x) * 3;
      out[o] = src[p];
      out[o + 1] = src[p + 1];
      out[o + 2] = src[p + 2];
    }
  }
  return out;
}

/**
 * Resize packed RGB (Uint8Array, width*height*3) to outWidth x outHeight with a manifest `resample` name.
 * @returns {Uint8Array}
 */
export function resizeRGB(src, width, height, outWidth, outHeight, resample) {
  if (outWidth === width && outHeight === height) return src.slice();
  if (resample === "nearest") return resizeNearest(src, width, height, outWidth, outHeight);
  const filter = FILTERS[resample];
  if (!filter) throw new Error(`unsupported resample filter "${resample}" (this app knows ${RESAMPLE_NAMES.join(", ")})`);
  const needH = outWidth !== width, needV = outHeight !== height;
  // Pillow (13) runs the vertical pass first when the height shrinks by more than twice as many pixels as the width.
  const horizontalFirst = !(height - outHeight > 0 && height - outHeight > (width - outWidth) * 2);
  const vertical = coefficients(height, outHeight, filter);
  if (!horizontalFirst) {
    const pixels = needV ? verticalPass(src, width, outHeight, vertical) : src;
    return needH ? horizontalPass(pixels, width, 0, outHeight, outWidth, filter) : pixels;
  }
  let pixels = src, rowWidth = width;
  if (needH) {
    // Only the input rows the vertical pass reads are resampled horizontally (as Pillow does).
    const rowFirst = vertical.bounds[0];
    const rowLast = vertical.bounds[outHeight * 2 - 2] + vertical.bounds[outHeight * 2 - 1];
    pixels = horizontalPass(src, width, rowFirst, rowLast - rowFirst, outWidth, filter);
    rowWidth = outWidth;
    for (let i = 0; i < outHeight; i++) vertical.bounds[i * 2] -= rowFirst;
  }
  return needV ? verticalPass(pixels, rowWidth, outHeight, vertical) : pixels;
}
