// Convolution as implicit GEMM over channels-last (NHWC) activations. No im2col is materialised:
// each workgroup gathers its A tile straight from the input with the conv's index arithmetic.
//
//   GEMM view:  Y[m, n] = sum_k A[m, k] * W[k, n]
//     m = (image, oy, ox)            M = N*OH*OW output pixels
//     k = (ky, kx, ci)               K = KH*KW*CIN     (weights repacked to [K, COUT] at load time)
//     n = output channel             COUT
//
// Epilogue (fused): + bias (BatchNorm folded into W and bias at load), + residual, ReLU.
//   RES_MODE 0: none
//   RES_MODE 1: residual of the output's shape (ResNet identity / downsample branch)
//   RES_MODE 2: nearest-upsampled residual [N, RH, RW, COUT] (FPN top-down merge), with ATen's
//               legacy "nearest" index rule: identity, exact 2x (dst >> 1), else
//               min(floor(dst * f32(in/out)), in - 1) with the scale computed on the host.
//
// Prepended consts (one pipeline per variant): KH, KW, STRIDE, PAD, CIN, COUT, RELU, RES_MODE,
// RM, RN (register block rows x columns per thread, each 4 or 8; chosen per layer on the host).
//
// Tiling: a (16*RM)x(16*RN) output tile per workgroup of 16x16 threads, each thread an RMxRN
// register block; K is walked in steps of 16 through workgroup memory stored as vec4, so the
// inner loop is RM*RN/4 vec4 FMAs per k against RM/4 + RN/4 vec4 workgroup-memory loads.
// On llvmpipe every lane-varying load is a per-lane scalar loop (~80 cycles per vec4 per 8
// lanes) while an FMA costs ~1 cycle, so loads per FMA set the speed: 8x8 halves them against
// 4x4 (docs/perf.md §9). 128x128 tiles with 8x8 blocks are also the usual GPU choice.

struct Params {
    n: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    m: u32,
    rh: u32,
    rw: u32,
    scale_h: f32,
    scale_w: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> wt: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
#if RESIDUAL
@group(0) @binding(5) var<storage, read> res: array<f32>;
#endif

const BM: u32 = 16u * RM;
const BN: u32 = 16u * RN;
const BK: u32 = 16u;
const KTOT: u32 = KH * KW * CIN;
const RM4: u32 = RM / 4u;
const RN4: u32 = RN / 4u;

// [k][m/4] and [k][n/4]: one vec4 holds four consecutive rows (A) or columns (B).
// At 8x8 the two are 16 KiB together: WebGPU's default workgroup-storage limit.
var<workgroup> As: array<vec4<f32>, BK * BM / 4u>;
var<workgroup> Bs: array<vec4<f32>, BK * BN / 4u>;

fn load_x(base: u32, iy: i32, ix: i32, ci: u32) -> f32 {
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return x[base + (u32(iy) * p.w + u32(ix)) * CIN + ci];
}

fn nearest_src(dst: u32, src_len: u32, dst_len: u32, scale: f32) -> u32 {
    if (dst_len == src_len) {
        return dst;
    }
    if (dst_len == 2u * src_len) {
        return dst >> 1u;
    }
    return min(u32(floor(f32(dst) * scale)), src_len - 1u);
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tid = lid.y * 16u + lid.x;
    let m0 = wid.x * BM;
    let n0 = wid.y * BN;
    let ohw = p.oh * p.ow;

    // A loader: this thread fills rows RM*(tid%16) .. +RM-1 of the tile at k-offset tid/16.
    let a_k = tid / 16u;
    let a_m = (tid % 16u) * RM;
    var a_base: array<u32, RM>;
    var a_iy: array<i32, RM>;
    var a_ix: array<i32, RM>;
    var a_ok: array<bool, RM>;
    for (var r = 0u; r < RM; r++) {
        let gm = m0 + a_m + r;
        a_ok[r] = gm < p.m;
        let g = min(gm, p.m - 1u);
        let img = g / ohw;
        let rem = g % ohw;
        let oy = rem / p.ow;
        let ox = rem % p.ow;
        a_base[r] = img * p.h * p.w * CIN;
        a_iy[r] = i32(oy * STRIDE) - i32(PAD);
        a_ix[r] = i32(ox * STRIDE) - i32(PAD);
    }
    // B loader: row tid/16, columns RN*(tid%16) .. +RN-1.
    let b_k = tid / 16u;
    let b_n = n0 + (tid % 16u) * RN;

    // acc[i * RN4 + j]: row i of this thread's block, columns 4j .. 4j+3.
    var acc: array<vec4<f32>, RM * RN4>;
    for (var i = 0u; i < RM * RN4; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    for (var k0 = 0u; k0 < KTOT; k0 += BK) {
        let k = k0 + a_k;
        let kin = k < KTOT;
        let tap = k / CIN;
        let ci = k % CIN;
        let ky = i32(tap / KW);
        let kx = i32(tap % KW);
        for (var q = 0u; q < RM4; q++) {
            var av = vec4<f32>(0.0);
            if (kin) {
                let r = 4u * q;
                if (a_ok[r]) { av.x = load_x(a_base[r], a_iy[r] + ky, a_ix[r] + kx, ci); }
                if (a_ok[r + 1u]) { av.y = load_x(a_base[r + 1u], a_iy[r + 1u] + ky, a_ix[r + 1u] + kx, ci); }
                if (a_ok[r + 2u]) { av.z = load_x(a_base[r + 2u], a_iy[r + 2u] + ky, a_ix[r + 2u] + kx, ci); }
                if (a_ok[r + 3u]) { av.w = load_x(a_base[r + 3u], a_iy[r + 3u] + ky, a_ix[r + 3u] + kx, ci); }
            }
            As[a_k * (BM / 4u) + (tid % 16u) * RM4 + q] = av;
        }

        let kb = k0 + b_k;
        let row = kb * COUT;
        for (var q = 0u; q < RN4; q++) {
            let nb = b_n + 4u * q;
            var bv = vec4<f32>(0.0);
            if (kb < KTOT) {
                if (nb + 3u < COUT) {
                    bv = vec4<f32>(wt[row + nb], wt[row + nb + 1u], wt[row + nb + 2u], wt[row + nb + 3u]);
                } else {
                    if (nb < COUT) { bv.x = wt[row + nb]; }
                    if (nb + 1u < COUT) { bv.y = wt[row + nb + 1u]; }
                    if (nb + 2u < COUT) { bv.z = wt[row + nb + 2u]; }
                }
            }
            Bs[b_k * (BN / 4u) + (tid % 16u) * RN4 + q] = bv;
        }
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            var b: array<vec4<f32>, RN4>;
            for (var j = 0u; j < RN4; j++) {
                b[j] = Bs[kk * (BN / 4u) + lid.x * RN4 + j];
            }
            for (var q = 0u; q < RM4; q++) {
                let a = As[kk * (BM / 4u) + lid.y * RM4 + q];
                for (var j = 0u; j < RN4; j++) {
                    acc[(4u * q) * RN4 + j] = fma(vec4<f32>(a.x), b[j], acc[(4u * q) * RN4 + j]);
                    acc[(4u * q + 1u) * RN4 + j] = fma(vec4<f32>(a.y), b[j], acc[(4u * q + 1u) * RN4 + j]);
                    acc[(4u * q + 2u) * RN4 + j] = fma(vec4<f32>(a.z), b[j], acc[(4u * q + 2u) * RN4 + j]);
                    acc[(4u * q + 3u) * RN4 + j] = fma(vec4<f32>(a.w), b[j], acc[(4u * q + 3u) * RN4 + j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var j = 0u; j < RN4; j++) {
        let n = n0 + lid.x * RN + 4u * j;
        if (n >= COUT) {
            break;
        }
        var bvec = vec4<f32>(0.0);
        for (var c = 0u; c < 4u; c++) {
            if (n + c < COUT) { bvec[c] = bias[n + c]; }
        }
        for (var i = 0u; i < RM; i++) {
            let m = m0 + lid.y * RM + i;
            if (m >= p.m) {
                break;
            }
            var v = acc[i * RN4 + j] + bvec;
#if RESIDUAL
            var ridx = m * COUT;
            if (RES_MODE == 2u) {
                let img = m / ohw;
                let rem = m % ohw;
                let sy = nearest_src(rem / p.ow, p.rh, p.oh, p.scale_h);
                let sx = nearest_src(rem % p.ow, p.rw, p.ow, p.scale_w);
                ridx = ((img * p.rh + sy) * p.rw + sx) * COUT;
            }
            for (var c = 0u; c < 4u; c++) {
                if (n + c < COUT) { v[c] += res[ridx + n + c]; }
            }
#endif
            if (RELU) {
                v = max(v, vec4<f32>(0.0));
            }
            let o = m * COUT + n;
            for (var c = 0u; c < 4u; c++) {
                if (n + c < COUT) { y[o + c] = v[c]; }
            }
        }
    }
}
