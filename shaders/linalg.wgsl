// Dense linear algebra on row-major matrices: the refinement head's projections and recurrent
// gates (docs/design.md §6). One entry point, `linear`:
//
//   Y[m, n] = act(sum_k X[m, k] * W[n, k] + b[n])      for m < rows, n < N
//
// W is PyTorch's nn.Linear layout [N, K] (out, in), so a checkpoint's tensor is used as stored.
// The live row count is read on the GPU: rows = min(m_cap, count[0] * rows_per_count), so a
// plan recorded once for `m_cap` rows serves any number of detections without a read-back
// (rows_per_count is 49 for the per-bin key/value projections, 1 otherwise). Rows at or past
// `rows` are neither read nor written.
//
// Tiling: a 16x16 workgroup computes a 64x64 output tile, each invocation a 4x4 block of it in
// registers. Each K-slice of 16 columns of the tile's 64 X rows and 64 W rows is staged in
// workgroup memory (4 loads per invocation per slice), and every staged value feeds 4 FMAs, so
// workgroup-memory reads per FMA drop 4x against one output per invocation. Accumulation is plain
// f32 in k order, per output.
//
// Prepended consts: ACT (u32: 0 none, 1 tanh).

struct Params {
    m_cap: u32,           // rows the X / Y buffers hold
    n: u32,               // output features (W rows)
    k: u32,               // input features (X columns, W columns)
    rows_per_count: u32,  // rows per unit of count[0]
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;       // [m_cap, K]
@group(0) @binding(2) var<storage, read> w: array<f32>;       // [N, K]
@group(0) @binding(3) var<storage, read> b: array<f32>;       // [N]
@group(0) @binding(4) var<storage, read> count: array<u32>;   // count[0]: live units
@group(0) @binding(5) var<storage, read_write> y: array<f32>; // [m_cap, N]

#include "activations.wgsl"

var<workgroup> xs: array<array<f32, 17>, 64>;  // [row in tile][k in slice], padded
var<workgroup> ws: array<array<f32, 17>, 64>;  // [n in tile][k in slice], padded

@compute @workgroup_size(16, 16, 1)
fn linear(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) l: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let rows = min(p.m_cap, count[0] * p.rows_per_count);
    let m0 = wg.y * 64u;
    let n0 = wg.x * 64u;
    // Uniform across the workgroup (count is read-only storage), so no barrier is skipped by part
    // of a workgroup.
    if (m0 >= rows) {
        return;
    }
    var acc: array<array<f32, 4>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        for (var i = 0u; i < 4u; i++) {
            let e = t + 256u * i;
            let r = e / 16u;
            let c = e % 16u;
            let kk = k0 + c;
            var xv = 0.0;
            if (m0 + r < rows && kk < p.k) {
                xv = x[(m0 + r) * p.k + kk];
            }
            xs[r][c] = xv;
            var wv = 0.0;
            if (n0 + r < p.n && kk < p.k) {
                wv = w[(n0 + r) * p.k + kk];
            }
            ws[r][c] = wv;
        }
        workgroupBarrier();
        for (var j = 0u; j < 16u; j++) {
            var a: array<f32, 4>;
            var bw: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = xs[l.y * 4u + i][j];
                bw[i] = ws[l.x * 4u + i][j];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var q = 0u; q < 4u; q++) {
                    acc[i][q] += a[i] * bw[q];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + l.y * 4u + i;
        for (var q = 0u; q < 4u; q++) {
            let n = n0 + l.x * 4u + q;
            if (m < rows && n < p.n) {
                var v = acc[i][q] + b[n];
                if (ACT == 1u) {
                    v = tanh_stable(v);
                }
                y[m * p.n + n] = v;
            }
        }
    }
}
