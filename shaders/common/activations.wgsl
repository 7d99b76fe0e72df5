// Activations that stay finite for every finite input. Included by linalg.wgsl and refine.wgsl.
//
// WGSL's builtin tanh may be evaluated as (e^2x - 1) / (e^2x + 1), which is inf/inf = NaN once
// e^2x overflows (|x| > ~44); these forms only ever exponentiate a non-positive number.

fn tanh_stable(v: f32) -> f32 {
    let e = exp(-2.0 * abs(v));
    return sign(v) * (1.0 - e) / (1.0 + e);
}

fn sigmoid_stable(v: f32) -> f32 {
    if (v >= 0.0) {
        return 1.0 / (1.0 + exp(-v));
    }
    let e = exp(v);
    return e / (1.0 + e);
}
