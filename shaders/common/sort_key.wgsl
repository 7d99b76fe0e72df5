// The NaN-safe sort key of an f32, shared by topk.wgsl (the RPN's per-level top-k) and nms.wgsl
// (the score order): a u32 that is monotone in the value, so "larger key" is "larger value" and
// an unsigned compare sorts descending as torch does. NaN (any payload, either sign) ranks above
// +inf (torch.topk and torch.sort treat NaN as the largest value), and -0 equals +0 (their tie is
// then broken by index, as for any equal values).
fn sort_key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let mag = b & 0x7fffffffu;
    if (mag > 0x7f800000u) {
        return 0xffffffffu;
    }
    if (mag == 0u) {
        return 0x80000000u;
    }
    if ((b & 0x80000000u) != 0u) {
        return ~b;
    }
    return b | 0x80000000u;
}
