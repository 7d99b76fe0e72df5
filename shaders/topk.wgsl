// Segmented top-k (the RPN's per-level top-k): for each segment l of a concatenated array, the
// k_l largest values, as indices in descending order with ties broken by the lower index, exactly.
//
// Design (exact, no sort of the whole segment):
//   every element gets a 56-bit composite key (hi = order-preserving u32 of the f32 value,
//   lo = 0xFFFFFF - index within the segment); composites are distinct, and "larger composite"
//   is "larger value, or equal value and lower index". An MSB-first radix select over the
//   composite (4 passes over hi, 3 over lo, 8 bits each; each pass = a histogram over the
//   elements that still match the chosen prefix + a one-workgroup pick of the digit) finds the
//   k-th largest composite T; a segment stops as soon as its chosen digit's whole bin is taken,
//   so the lo passes only run where values tie at the boundary (and cost a launch otherwise).
//   Then every element >= T is appended (unordered) to the segment's candidate list (exactly k_l),
//   and each candidate's output position is its rank = #candidates with a larger composite
//   (k_l <= a few thousand, O(k²) compares from workgroup memory).
// One entry point per variant: the K_* flags select which bindings exist, because an auto layout
// drops unused bindings and the host binds buffers at 1, 2, ... in order.
// Prepended consts: K_INIT, K_KEYS, K_HIST, K_SELECT, K_COMPACT, K_RANK (bool, exactly one true);
// CHUNK (u32): elements per histogram workgroup.

const WG: u32 = 256u;
const PASSES: u32 = 7u;
const MAX_SEG: u32 = 8u;
// state[] layout: per segment s at 4s: (prefix_hi, prefix_lo, k_remaining, done); candidate
// counters at STATE_CNT + s.
const STATE_CNT: u32 = 32u;

struct TopkParams {
    pass_: u32,
    n_seg: u32,
    total: u32,
    chunks: u32,
    // per segment: (offset in the concatenated array, length, first histogram chunk, k)
    seg: array<vec4<u32>, 8>,
    // per segment: (first output slot, 0, 0, 0)
    out: array<vec4<u32>, 8>,
}

// sort_key: larger f32 → larger u32, NaN above +inf (torch.topk treats NaN as the largest), -0
// equal to +0 (their tie is then broken by index, as for any equal values).
#include "sort_key.wgsl"

fn lo_of(index: u32) -> u32 {
    return 0xffffffu - index;
}

// The segment of element/chunk g, given ascending starts in component `c` of seg[].
fn seg_of_chunk(g: u32, n_seg: u32, starts: array<vec4<u32>, 8>) -> u32 {
    var s = 0u;
    for (var j = 1u; j < n_seg; j++) {
        if (g >= starts[j].z) {
            s = j;
        }
    }
    return s;
}

#if K_INIT
@group(0) @binding(0) var<uniform> tp: TopkParams;
@group(0) @binding(1) var<storage, read_write> hist: array<u32>;
@group(0) @binding(2) var<storage, read_write> state: array<u32>;

// Zeroes the histograms and counters and arms each segment (a k = 0 segment starts done).
@compute @workgroup_size(256, 1, 1)
fn topk_init(@builtin(local_invocation_index) t: u32) {
    for (var i = t; i < PASSES * MAX_SEG * 256u; i += WG) {
        hist[i] = 0u;
    }
    if (t < MAX_SEG) {
        var k = 0u;
        if (t < tp.n_seg) {
            k = tp.seg[t].w;
        }
        state[4u * t] = 0u;
        state[4u * t + 1u] = 0u;
        state[4u * t + 2u] = k;
        state[4u * t + 3u] = select(0u, 1u, k == 0u);
        state[STATE_CNT + t] = 0u;
    }
}
#endif

#if K_KEYS
struct KeysParams {
    offset: u32,
    n: u32,
    pad0: u32,
    pad1: u32,
}
@group(0) @binding(0) var<uniform> kp: KeysParams;
@group(0) @binding(1) var<storage, read> values: array<f32>;
@group(0) @binding(2) var<storage, read_write> keys: array<u32>;

// One segment's values → its slice of the concatenated key array.
@compute @workgroup_size(256, 1, 1)
fn topk_keys(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= kp.n) {
        return;
    }
    keys[kp.offset + i] = sort_key(values[i]);
}
#endif

#if K_HIST
@group(0) @binding(0) var<uniform> tp: TopkParams;
@group(0) @binding(1) var<storage, read> keys: array<u32>;
@group(0) @binding(2) var<storage, read> state: array<u32>;
@group(0) @binding(3) var<storage, read_write> hist: array<atomic<u32>>;

var<workgroup> local_hist: array<atomic<u32>, 256>;
var<workgroup> wg_state: vec4<u32>;

// The digit of this pass for an element still matching the prefix chosen so far, or -1.
fn digit(hi: u32, lo: u32, p: u32, ph: u32, pl: u32) -> i32 {
    if (p < 4u) {
        let shift = 24u - 8u * p;
        if (p > 0u && (hi >> (shift + 8u)) != (ph >> (shift + 8u))) {
            return -1;
        }
        return i32((hi >> shift) & 255u);
    }
    if (hi != ph) {
        return -1;
    }
    let shift = 16u - 8u * (p - 4u);
    if (p > 4u && (lo >> (shift + 8u)) != (pl >> (shift + 8u))) {
        return -1;
    }
    return i32((lo >> shift) & 255u);
}

@compute @workgroup_size(256, 1, 1)
fn topk_hist(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let g = wid.x + wid.y * nwg.x;
    if (g >= tp.chunks) {
        return;
    }
    let s = seg_of_chunk(g, tp.n_seg, tp.seg);
    let sg = tp.seg[s];
    if (t == 0u) {
        wg_state = vec4<u32>(state[4u * s], state[4u * s + 1u], state[4u * s + 2u], state[4u * s + 3u]);
    }
    let st = workgroupUniformLoad(&wg_state);
    if (st.w != 0u) {
        return;
    }
    atomicStore(&local_hist[t], 0u);
    workgroupBarrier();
    let start = (g - sg.z) * CHUNK;
    let end = min(start + CHUNK, sg.y);
    for (var i = start + t; i < end; i += WG) {
        let d = digit(keys[sg.x + i], lo_of(i), tp.pass_, st.x, st.y);
        if (d >= 0) {
            atomicAdd(&local_hist[u32(d)], 1u);
        }
    }
    workgroupBarrier();
    let c = atomicLoad(&local_hist[t]);
    if (c != 0u) {
        atomicAdd(&hist[(tp.pass_ * MAX_SEG + s) * 256u + t], c);
    }
}
#endif

#if K_SELECT
@group(0) @binding(0) var<uniform> tp: TopkParams;
@group(0) @binding(1) var<storage, read> hist: array<u32>;
@group(0) @binding(2) var<storage, read_write> state: array<u32>;

#include "scan.wgsl"

var<workgroup> wg_state: vec4<u32>;

// One workgroup per segment: the digit whose bin holds the k_remaining-th largest element.
@compute @workgroup_size(256, 1, 1)
fn topk_select(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let s = wid.x;
    if (s >= tp.n_seg) {
        return;
    }
    if (t == 0u) {
        wg_state = vec4<u32>(state[4u * s], state[4u * s + 1u], state[4u * s + 2u], state[4u * s + 3u]);
    }
    let st = workgroupUniformLoad(&wg_state);
    if (st.w != 0u) {
        return;
    }
    // Invocation t holds bin 255 - t, so an inclusive prefix sum counts the bins >= that bin.
    let bin = 255u - t;
    let c = hist[(tp.pass_ * MAX_SEG + s) * 256u + bin];
    let incl = workgroup_scan_256(t, c).x;
    let above = incl - c;
    let k = st.z;
    // Exactly one non-empty bin satisfies this (k <= elements matching the prefix).
    if (c > 0u && above < k && incl >= k) {
        let rem = k - above;
        var ph = st.x;
        var pl = st.y;
        if (tp.pass_ < 4u) {
            ph = ph | (bin << (24u - 8u * tp.pass_));
        } else {
            pl = pl | (bin << (16u - 8u * (tp.pass_ - 4u)));
        }
        state[4u * s] = ph;
        state[4u * s + 1u] = pl;
        state[4u * s + 2u] = rem;
        // The whole bin is taken: the threshold is this prefix with zero low bits.
        state[4u * s + 3u] = select(0u, 1u, rem == c);
    }
}
#endif

#if K_COMPACT
@group(0) @binding(0) var<uniform> tp: TopkParams;
@group(0) @binding(1) var<storage, read> keys: array<u32>;
@group(0) @binding(2) var<storage, read_write> state: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> cand: array<u32>;

// Appends every element whose composite is >= its segment's threshold (exactly k of them).
@compute @workgroup_size(256, 1, 1)
fn topk_compact(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= tp.total) {
        return;
    }
    var s = 0u;
    for (var j = 1u; j < tp.n_seg; j++) {
        if (i >= tp.seg[j].x) {
            s = j;
        }
    }
    let sg = tp.seg[s];
    if (sg.w == 0u) {
        return;
    }
    let local = i - sg.x;
    let hi = keys[i];
    let ph = atomicLoad(&state[4u * s]);
    let pl = atomicLoad(&state[4u * s + 1u]);
    if (hi > ph || (hi == ph && lo_of(local) >= pl)) {
        let slot = atomicAdd(&state[STATE_CNT + s], 1u);
        if (slot < sg.w) {
            cand[tp.out[s].x + slot] = local;
        }
    }
}
#endif

#if K_RANK
@group(0) @binding(0) var<uniform> tp: TopkParams;
@group(0) @binding(1) var<storage, read> keys: array<u32>;
@group(0) @binding(2) var<storage, read> cand: array<u32>;
@group(0) @binding(3) var<storage, read_write> order: array<u32>;

var<workgroup> tile_hi: array<u32, 256>;
var<workgroup> tile_lo: array<u32, 256>;

// Grid (ceil(max k / 256), segments): each candidate's rank among its segment's candidates is its
// output slot; writes the global (concatenated) index there.
@compute @workgroup_size(256, 1, 1)
fn topk_rank(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let s = wid.y;
    if (s >= tp.n_seg) {
        return;
    }
    let sg = tp.seg[s];
    let k = sg.w;
    let off = tp.out[s].x;
    if (wid.x * WG >= k) {
        return;
    }
    let j = wid.x * WG + t;
    var my_hi = 0u;
    var my_lo = 0u;
    var my_local = 0u;
    if (j < k) {
        my_local = cand[off + j];
        my_hi = keys[sg.x + my_local];
        my_lo = lo_of(my_local);
    }
    var rank = 0u;
    for (var base = 0u; base < k; base += WG) {
        let q = base + t;
        if (q < k) {
            let c = cand[off + q];
            tile_hi[t] = keys[sg.x + c];
            tile_lo[t] = lo_of(c);
        }
        workgroupBarrier();
        let m = min(WG, k - base);
        for (var r = 0u; r < m; r++) {
            let h = tile_hi[r];
            rank += select(0u, 1u, h > my_hi || (h == my_hi && tile_lo[r] > my_lo));
        }
        workgroupBarrier();
    }
    if (j < k) {
        order[off + rank] = sg.x + my_local;
    }
}
#endif
