// Greedy non-maximum suppression, decision-exact to torchvision's CPU kernel and to both of its
// batched_nms paths (docs/torchvision-semantics.md §7). Four stages are compiled from this file;
// one Bool const per stage selects that stage's bindings (an auto layout must see every binding
// used):
//
//   STAGE_RANK    stable descending sort of the live scores, as ranks: O(n²) comparisons, exact
//                 and order-independent (no multi-pass sort network to get wrong at n ≈ 5000)
//   STAGE_PREP    one workgroup: live count, batched path choice, the coordinate trick's shift
//                 (max over the live boxes, then f32 offsets), areas, boxes gathered in score order
//   STAGE_MASK    bit b of mask[a][w] is set when sorted box a (kept) would suppress sorted box
//                 32·w + b (a < b); 32 columns per u32 word
//   STAGE_GREEDY  one workgroup walks the sorted boxes word by word, reproducing the sequential
//                 keep rule, and writes the kept original indices in score order, up to max_out
//
// Prepended consts: STAGE_RANK, STAGE_PREP, STAGE_MASK, STAGE_GREEDY, BATCHED (bool) and WORDS
// (u32, ceil(capacity / 32): the row length of the mask and the greedy pass's workgroup array).
//
// Exactness on a GPU. WGSL rounds f32 +, -, * correctly but allows 2.5 ULP for division and lets
// backends fuse a * b + c into an FMA. So (1) every product that feeds an add goes through
// `opaque`, an XOR with a uniform that is always 0 but that the compiler cannot see, which forces
// the rounded product to exist; (2) there is no division: `f32(inter / union) > thr` is decided
// with integer arithmetic on the operands' mantissas (see `iou_exceeds`); (3) NaN is detected on
// bit patterns, never with float compares a backend may assume NaN-free.

struct Params {
    cap: u32,
    count_index: u32,
    out_index: u32,
    max_out: u32,
    // batched_nms takes the coordinate trick while the live count is at most this (torchvision CPU:
    // numel ≤ 4000 → 1000 boxes).
    trick_max: u32,
    // The midpoint between thr and the next f32 above it is thr_mant · 2^thr_exp (thr_mant in
    // [2^24, 2^25)); tie_up says which way f32 rounding sends that midpoint.
    thr_mant: u32,
    thr_exp: i32,
    tie_up: u32,
    // Always 0 (see `opaque`).
    zero: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

const QNAN: u32 = 0x7fc00000u;

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// The value itself, through an operation the compiler cannot fold: blocks FMA contraction.
fn opaque(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) ^ p.zero);
}

// sort_key: torch's descending order as an unsigned key: NaN above +inf (torch sorts NaN as
// largest), -0 == +0, otherwise monotone in the float value.
#include "sort_key.wgsl"

// std::max / std::min as the CPU kernel calls them (a NaN second operand is dropped).
fn std_max(a: f32, b: f32) -> f32 {
    return select(a, b, a < b);
}
fn std_min(a: f32, b: f32) -> f32 {
    return select(a, b, b < a);
}

// A positive finite f32 as (mantissa in [2^23, 2^24), exponent): x = m · 2^e. Subnormals are
// normalised.
fn mant_exp(x: f32) -> vec2<i32> {
    let b = bitcast<u32>(x);
    let e = i32((b >> 23u) & 0xffu);
    let f = b & 0x7fffffu;
    if (e == 0) {
        let s = countLeadingZeros(f) - 8u;
        return vec2<i32>(i32(f << s), -149 - i32(s));
    }
    return vec2<i32>(i32(f | 0x800000u), e - 150);
}

// Whether torchvision's `f32(inter / uni) > thr` holds, without dividing. f32 rounding is monotone,
// so f32(q) > thr exactly when q is above the midpoint m between thr and the next f32 (or equal to
// it and rounding goes up). With inter = Mi·2^Ei, uni = Mu·2^Eu and m = Mm·2^Em that is
// Mi·2^d > Mm·Mu with d = Ei − Em − Eu, compared in 64 bits (Mm·Mu < 2^49).
// Requires inter > 0 finite; thr ≥ 0.
fn iou_exceeds(inter: f32, uni: f32) -> bool {
    let ub = bitcast<u32>(uni);
    let umag = ub & 0x7fffffffu;
    if (umag > 0x7f800000u) {
        return false; // NaN IoU
    }
    if (umag == 0u) {
        return ub == 0u; // inter / +0 = +inf, inter / -0 = -inf
    }
    if ((ub & 0x80000000u) != 0u) {
        return false; // negative IoU (inverted boxes)
    }
    if (bitcast<u32>(inter) >= 0x7f800000u) {
        return umag < 0x7f800000u; // inf / finite = inf; inf / inf = NaN
    }
    if (umag == 0x7f800000u) {
        return false; // finite / inf = 0
    }
    let i = mant_exp(inter);
    let u = mant_exp(uni);
    let d = i.y - p.thr_exp - u.y;
    // Mi·2^d < 2^46 ≤ 2^47 ≤ Mm·Mu for d ≤ 22, and ≥ 2^50 > Mm·Mu for d ≥ 27.
    if (d <= 22) {
        return false;
    }
    if (d >= 27) {
        return true;
    }
    let mi = u32(i.x);
    let sh = u32(d);
    let a_hi = mi >> (32u - sh);
    let a_lo = mi << sh;
    // Mm·Mu from 16-bit halves (Mm < 2^25, Mu < 2^24).
    let mu = u32(u.x);
    let ml = p.thr_mant & 0xffffu;
    let mh = p.thr_mant >> 16u;
    let ul = mu & 0xffffu;
    let uh = mu >> 16u;
    let ll = ml * ul;
    let mid = ml * uh + mh * ul;
    let p_lo = ll + (mid << 16u);
    let carry = select(0u, 1u, p_lo < ll);
    let p_hi = mh * uh + (mid >> 16u) + carry;
    if (a_hi != p_hi) {
        return a_hi > p_hi;
    }
    if (a_lo != p_lo) {
        return a_lo > p_lo;
    }
    return p.tie_up != 0u;
}

// Whether kept box `a` suppresses box `b` (areas already checked to be non-NaN).
fn suppresses(a: vec4<f32>, area_a: f32, b: vec4<f32>, area_b: f32) -> bool {
    let xx1 = std_max(a.x, b.x);
    let yy1 = std_max(a.y, b.y);
    let xx2 = std_min(a.z, b.z);
    let yy2 = std_min(a.w, b.w);
    let w = std_max(0.0, xx2 - xx1);
    let h = std_max(0.0, yy2 - yy1);
    let inter = opaque(w * h);
    // 0 / union is 0 (or NaN): never above a threshold ≥ 0.
    if (!(inter > 0.0)) {
        return false;
    }
    let uni = opaque(area_a + area_b) - inter;
    return iou_exceeds(inter, opaque(uni));
}

#if STAGE_RANK
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read> count_in: array<u32>;
@group(0) @binding(3) var<storage, read_write> order: array<u32>;

var<workgroup> n_rank: u32;
var<workgroup> tile: array<u32, 256>;

// rank(i) = #{j : key_j > key_i, or key_j == key_i and j < i}: a stable descending sort.
// order[rank(i)] = i.
@compute @workgroup_size(256, 1, 1)
fn rank(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (lid == 0u) {
        n_rank = min(count_in[p.count_index], p.cap);
    }
    let n = workgroupUniformLoad(&n_rank);
    let base = wid.x * 256u;
    if (base >= n) {
        return;
    }
    let i = base + lid;
    let live = i < n;
    var ki = 0u;
    if (live) {
        ki = sort_key(scores[i]);
    }
    var r = 0u;
    for (var t0 = 0u; t0 < n; t0 += 256u) {
        if (t0 + lid < n) {
            tile[lid] = sort_key(scores[t0 + lid]);
        }
        workgroupBarrier();
        let m = min(256u, n - t0);
        for (var k = 0u; k < m; k++) {
            let kj = tile[k];
            if (kj > ki || (kj == ki && t0 + k < i)) {
                r += 1u;
            }
        }
        workgroupBarrier();
    }
    if (live) {
        order[r] = i;
    }
}
#endif

#if STAGE_PREP
@group(0) @binding(1) var<storage, read> boxes: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> count_in: array<u32>;
@group(0) @binding(3) var<storage, read> order: array<u32>;
@group(0) @binding(4) var<storage, read_write> sbox: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> sarea: array<f32>;
// [0] live count, [1] 1 when the batched vanilla path (class-masked IoU) applies.
@group(0) @binding(6) var<storage, read_write> state: array<u32>;
#if BATCHED
@group(0) @binding(7) var<storage, read> ids: array<u32>;
@group(0) @binding(8) var<storage, read_write> sid: array<u32>;
#endif

var<workgroup> n_prep: u32;
var<workgroup> red_max: array<f32, 256>;
var<workgroup> red_nan: array<u32, 256>;

@compute @workgroup_size(256, 1, 1)
fn prep(@builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        n_prep = min(count_in[p.count_index], p.cap);
    }
    let n = workgroupUniformLoad(&n_prep);
    var trick = false;
#if BATCHED
    trick = n <= p.trick_max;
#endif
    // The trick's offset factor max_coordinate + 1, and whether the max was finite.
    var max_plus_one = 0.0;
    var shift_finite = true;
    if (trick) {
        var m = bitcast<f32>(0xff800000u);
        var nan = 0u;
        for (var k = lid; k < 4u * n; k += 256u) {
            let v = boxes[k / 4u][k % 4u];
            if (is_nan(v)) {
                nan = 1u;
            } else if (v > m) {
                m = v;
            }
        }
        red_max[lid] = m;
        red_nan[lid] = nan;
        workgroupBarrier();
        for (var s = 128u; s > 0u; s >>= 1u) {
            if (lid < s) {
                let o = red_max[lid + s];
                if (o > red_max[lid]) {
                    red_max[lid] = o;
                }
                red_nan[lid] |= red_nan[lid + s];
            }
            workgroupBarrier();
        }
        let mx = red_max[0];
        // A NaN max makes every shifted coordinate NaN; an infinite one makes 0·inf = NaN or inf
        // offsets, whose areas are inf − inf = NaN. Either way torchvision suppresses nothing.
        shift_finite = red_nan[0] == 0u && (bitcast<u32>(mx) & 0x7f800000u) != 0x7f800000u;
        max_plus_one = mx + 1.0;
    }
    for (var pos = lid; pos < n; pos += 256u) {
        let i = order[pos];
        var b = boxes[i];
        var nan = is_nan(b.x) || is_nan(b.y) || is_nan(b.z) || is_nan(b.w);
#if BATCHED
        let c = ids[i];
        sid[pos] = c;
        if (trick) {
            // offsets = idxs.to(f32) * (max + 1); boxes + offsets, each rounded to f32.
            let off = opaque(f32(c) * max_plus_one);
            b = vec4<f32>(opaque(b.x + off), opaque(b.y + off), opaque(b.z + off), opaque(b.w + off));
            nan = nan || !shift_finite;
        }
#endif
        var area = (b.z - b.x) * (b.w - b.y);
        if (nan) {
            area = bitcast<f32>(QNAN);
        }
        sbox[pos] = b;
        sarea[pos] = area;
    }
    if (lid == 0u) {
        state[0] = n;
        var vanilla = 0u;
#if BATCHED
        vanilla = select(1u, 0u, trick);
#endif
        state[1] = vanilla;
    }
}
#endif

#if STAGE_MASK
@group(0) @binding(1) var<storage, read> sbox: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> sarea: array<f32>;
@group(0) @binding(3) var<storage, read> state: array<u32>;
@group(0) @binding(4) var<storage, read_write> mask: array<u32>;
#if BATCHED
@group(0) @binding(5) var<storage, read> sid: array<u32>;
#endif

// One invocation per (sorted row a, word w). Only the words the greedy pass reads are written:
// w from a's own word up to the last live word.
@compute @workgroup_size(256, 1, 1)
fn mask_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = state[0];
    let a = gid.x;
    let w = gid.y;
    if (a >= n || w < a / 32u || w * 32u >= n) {
        return;
    }
    let box_a = sbox[a];
    let area_a = sarea[a];
    var bits = 0u;
    if (!is_nan(area_a)) {
#if BATCHED
        let vanilla = state[1] != 0u;
        let id_a = sid[a];
#endif
        let first = max(w * 32u, a + 1u);
        let last = min(w * 32u + 32u, n);
        for (var b = first; b < last; b++) {
#if BATCHED
            if (vanilla && sid[b] != id_a) {
                continue;
            }
#endif
            let area_b = sarea[b];
            if (!is_nan(area_b) && suppresses(box_a, area_a, sbox[b], area_b)) {
                bits |= 1u << (b - w * 32u);
            }
        }
    }
    mask[a * WORDS + w] = bits;
}
#endif

#if STAGE_GREEDY
@group(0) @binding(1) var<storage, read> mask: array<u32>;
@group(0) @binding(2) var<storage, read> order: array<u32>;
@group(0) @binding(3) var<storage, read> state: array<u32>;
@group(0) @binding(4) var<storage, read_write> keep_out: array<u32>;
@group(0) @binding(5) var<storage, read_write> count_out: array<u32>;

// Bit b of removed[w]: sorted box 32·w + b is suppressed by a box kept so far.
var<workgroup> removed: array<u32, WORDS>;
var<workgroup> n_greedy: u32;
var<workgroup> word_kept: u32;
var<workgroup> kept_total: u32;

// Word w's 32 boxes are resolved in order by one invocation (a suppression inside the word
// depends on the boxes just before it); then the whole workgroup ORs the kept rows into the later
// words. Same result as the sequential loop: a box is kept iff no earlier kept box suppresses it.
@compute @workgroup_size(256, 1, 1)
fn greedy(@builtin(local_invocation_index) lid: u32) {
    for (var t = lid; t < WORDS; t += 256u) {
        removed[t] = 0u;
    }
    if (lid == 0u) {
        n_greedy = state[0];
        kept_total = 0u;
    }
    let n = workgroupUniformLoad(&n_greedy);
    let words = (n + 31u) / 32u;
    for (var w = 0u; w < words; w++) {
        if (lid == 0u) {
            var r = removed[w];
            var bits = 0u;
            var kept = kept_total;
            let last = min(32u, n - w * 32u);
            for (var b = 0u; b < last; b++) {
                if (kept >= p.max_out) {
                    break;
                }
                if (((r >> b) & 1u) == 0u) {
                    let pos = w * 32u + b;
                    bits |= 1u << b;
                    keep_out[kept] = order[pos];
                    kept += 1u;
                    r |= mask[pos * WORDS + w];
                }
            }
            word_kept = bits;
            kept_total = kept;
        }
        let bits = workgroupUniformLoad(&word_kept);
        for (var t = w + 1u + lid; t < words; t += 256u) {
            var acc = removed[t];
            var rest = bits;
            while (rest != 0u) {
                let b = firstTrailingBit(rest);
                rest &= rest - 1u;
                acc |= mask[(w * 32u + b) * WORDS + t];
            }
            removed[t] = acc;
        }
        if (workgroupUniformLoad(&kept_total) >= p.max_out) {
            break;
        }
    }
    if (lid == 0u) {
        count_out[p.out_index] = kept_total;
    }
}
#endif
