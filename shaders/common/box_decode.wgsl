// torchvision's BoxCoder.decode_single for one box with weights (10, 10, 5, 5), followed by
// clip_boxes_to_image (docs/torchvision-semantics.md): included by box_head.wgsl (per-class
// decode) and refine.wgsl (the refinement step), so both decode exactly alike.
//
// `b` is (x1, y1, x2, y2), `d` the raw deltas (dx, dy, dw, dh) before division by the weights;
// the result is clipped to [0, img_w] x [0, img_h]. dw and dh are clamped at ln(1000 / 16).

// ln(1000 / 16) rounded to f32, as torchvision's BoxCoder clamps dw, dh.
const BBOX_XFORM_CLIP: f32 = 4.135166556742356;

fn decode_clip_box(b: vec4<f32>, d: vec4<f32>, img_h: f32, img_w: f32) -> vec4<f32> {
    let w = b.z - b.x;
    let h = b.w - b.y;
    let cx = b.x + 0.5 * w;
    let cy = b.y + 0.5 * h;
    let dx = d.x / 10.0;
    let dy = d.y / 10.0;
    let dw = min(d.z / 5.0, BBOX_XFORM_CLIP);
    let dh = min(d.w / 5.0, BBOX_XFORM_CLIP);
    let pcx = dx * w + cx;
    let pcy = dy * h + cy;
    let pw = exp(dw) * w;
    let ph = exp(dh) * h;
    let x1 = clamp(pcx - 0.5 * pw, 0.0, img_w);
    let y1 = clamp(pcy - 0.5 * ph, 0.0, img_h);
    let x2 = clamp(pcx + 0.5 * pw, 0.0, img_w);
    let y2 = clamp(pcy + 0.5 * ph, 0.0, img_h);
    return vec4<f32>(x1, y1, x2, y2);
}
