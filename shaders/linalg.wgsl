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
// Tiling: a 16x16 workgroup computes a 16x16 output tile; each K-slice of 16 of X's rows and of
// W's rows is staged in workgroup memory, so every X and W element is read from storage once per
// tile instead of once per output. Accumulation is plain f32 in k order.
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

var<workgroup> xs: array<array<f32, 16>, 16>;  // [row in tile][k in slice]
var<workgroup> ws: array<array<f32, 17>, 16>;  // [n in tile][k in slice], padded against bank conflicts

@compute @workgroup_size(16, 16, 1)
fn linear(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let rows = min(p.m_cap, count[0] * p.rows_per_count);
    let m0 = wg.y * 16u;
    let n0 = wg.x * 16u;
    // Uniform across the workgroup (count is read-only storage), so no barrier is skipped by part
    // of a workgroup.
    if (m0 >= rows) {
        return;
    }
    let m = m0 + l.y;
    let n = n0 + l.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        let kx = k0 + l.x;
        var xv = 0.0;
        if (m < rows && kx < p.k) {
            xv = x[m * p.k + kx];
        }
        xs[l.y][l.x] = xv;
        let nw = n0 + l.y;
        var wv = 0.0;
        if (nw < p.n && kx < p.k) {
            wv = w[nw * p.k + kx];
        }
        ws[l.y][l.x] = wv;
        workgroupBarrier();
        for (var j = 0u; j < 16u; j++) {
            acc += xs[l.y][j] * ws[l.x][j];
        }
        workgroupBarrier();
    }
    if (m < rows && n < p.n) {
        var v = acc + b[n];
        if (ACT == 1u) {
            v = tanh_stable(v);
        }
        y[m * p.n + n] = v;
    }
}
