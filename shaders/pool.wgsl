// Max pooling over NHWC, one invocation per output element. Taps outside the input are skipped,
// which equals PyTorch's -inf padding. Used for the stem's 3x3/2 pool (pad 1) and for FPN's
// LastLevelMaxPool (kernel 1, stride 2, pad 0: a pure [::2, ::2] subsample of P5).
// Prepended consts: KSIZE, STRIDE, PAD.

struct Params {
    n: u32,
    h: u32,
    w: u32,
    c: u32,
    oh: u32,
    ow: u32,
    total: u32,
    pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.total) {
        return;
    }
    let c = i % p.c;
    let pix = i / p.c;
    let ox = pix % p.ow;
    let oy = (pix / p.ow) % p.oh;
    let img = pix / (p.ow * p.oh);
    var best = -3.4028234663852886e38;
    var any = false;
    for (var ky = 0u; ky < KSIZE; ky++) {
        let iy = i32(oy * STRIDE + ky) - i32(PAD);
        if (iy < 0 || iy >= i32(p.h)) { continue; }
        for (var kx = 0u; kx < KSIZE; kx++) {
            let ix = i32(ox * STRIDE + kx) - i32(PAD);
            if (ix < 0 || ix >= i32(p.w)) { continue; }
            let v = x[((img * p.h + u32(iy)) * p.w + u32(ix)) * p.c + c];
            // NaN propagates as in PyTorch's max pool.
            if (!any || v > best || v != v) {
                best = v;
                any = true;
            }
        }
    }
    y[i] = best;
}
