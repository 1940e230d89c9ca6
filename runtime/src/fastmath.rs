//! Vocabulary-wide arithmetic in forms the compiler vectorizes: sampling and log-probabilities take an `exp` of
//! every logit each step, which through libm cost milliseconds a token at a vocabulary of 262144, and every step
//! finds the largest logit.

/// The sum of `values` in f64, in eight running sums (which the compiler keeps in vector lanes).
pub fn sum(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut eights = values.chunks_exact(8);
    for eight in &mut eights {
        for (lane, &v) in lanes.iter_mut().zip(eight) {
            *lane += v as f64;
        }
    }
    let tail: f64 = eights.remainder().iter().map(|&v| v as f64).sum();
    lanes.iter().sum::<f64>() + tail
}

/// The largest of `values`, NaN ignored (`-inf` when there is none), in eight running maxima (which the compiler
/// keeps in vector lanes): `fold(f32::max)` is one chain of dependent compares, 8.5 µs over a vocabulary of 49152
/// where this takes 2.4 (AVX2 host).
pub fn max(values: &[f32]) -> f32 {
    // A compare and a select, which NaN never wins (`f32::max`'s NaN handling keeps the loop from vectorizing).
    let larger = |m: f32, v: f32| if v > m { v } else { m };
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut eights = values.chunks_exact(8);
    for eight in &mut eights {
        for (lane, &v) in lanes.iter_mut().zip(eight) {
            *lane = larger(*lane, v);
        }
    }
    lanes
        .into_iter()
        .chain(eights.remainder().iter().copied())
        .fold(f32::NEG_INFINITY, larger)
}

/// The index of the first largest of `values`, NaN ignored (0 when there is none): greedy decoding's token. The
/// maximum first, then its first position: a loop keeping the best index so far took 31-34 µs a token over 49152
/// logits, this 3.
pub fn argmax(values: &[f32]) -> u32 {
    let top = max(values);
    values.iter().position(|&v| v == top).unwrap_or(0) as u32
}

/// `e^x` for `x <= 0` within 2 ulp (0 below about `e^-87`, where f32 runs out of normal numbers; NaN gives 0),
/// in plain arithmetic the compiler vectorizes (a vocabulary of 262144 through libm's `exp` took milliseconds):
/// `2^n * e^r`, with `n` the nearest integer to `x / ln 2`, `r = x - n ln 2` taken off in two parts (Cody and
/// Waite) so that it stays exact, and `e^r` its Taylor polynomial on `[-ln 2 / 2, ln 2 / 2]`.
pub fn exp_le0(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and taking away 1.5 * 2^23 rounds to the nearest integer.
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let two_n = f32::from_bits(((n as i32 + 127).max(0) as u32) << 23);
    if n >= -126.0 {
        two_n * p
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_le0_is_within_2_ulp_down_to_underflow() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = (x as f64).exp();
            let got = exp_le0(x) as f64;
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON as f64 * want,
                "e^{x}: {got} for {want}"
            );
            x -= 0.0137;
        }
        assert_eq!(exp_le0(-200.0), 0.0);
        assert_eq!(exp_le0(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_le0(f32::NAN), 0.0);
        assert_eq!(exp_le0(0.0), 1.0);
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        // Past a multiple of 8, so the tail counts too.
        let mut values: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1009) as f32 - 500.0)
            .collect();
        let want = (0..values.len()).fold(0, |b, i| if values[i] > values[b] { i } else { b });
        assert_eq!(argmax(&values), want as u32);
        assert_eq!(max(&values), values[want]);
        values[1002] = 1e9;
        assert_eq!(argmax(&values), 1002);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -2.0, -1.0, f32::NAN]), 2);
        assert_eq!(max(&[f32::NAN; 11]), f32::NEG_INFINITY);
        assert_eq!(argmax(&[f32::NAN; 11]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn sums_every_value() {
        let values: Vec<f32> = (0..1003).map(|i| i as f32 * 0.5).collect();
        assert_eq!(sum(&values), 1002.0 * 1003.0 / 4.0);
    }
}
