// Workgroup-wide inclusive prefix sum over 256 invocations (Hillis–Steele in workgroup memory).
// Included by topk.wgsl (topk_select), rpn.wgsl (rpn_filter) and box_head.wgsl (compact).
//
// Contract: the entry point has @workgroup_size(256) and passes its local_invocation_index as `t`;
// every invocation calls it from uniform control flow (it holds barriers). Returns
// (v summed over invocations 0..=t, v summed over all 256). It ends with a barrier, so it may be
// called again at once (in a loop over chunks) without a race on its workgroup array.

var<workgroup> scan_256: array<u32, 256>;

fn workgroup_scan_256(t: u32, v: u32) -> vec2<u32> {
    scan_256[t] = v;
    workgroupBarrier();
    for (var off = 1u; off < 256u; off <<= 1u) {
        var x = 0u;
        if (t >= off) {
            x = scan_256[t - off];
        }
        workgroupBarrier();
        scan_256[t] += x;
        workgroupBarrier();
    }
    let r = vec2<u32>(scan_256[t], scan_256[255]);
    workgroupBarrier();
    return r;
}
