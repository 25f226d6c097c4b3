//! FP8 number formats of the OCP 8-bit floating-point specification, as Hopper tensor cores use them.
//!
//! * **E4M3** ("fn" variant): 4 exponent bits (bias 7), 3 mantissa bits, no infinities, one NaN
//!   pattern per sign (`S.1111.111`), largest finite value 448, smallest subnormal 2^-9.
//! * **E5M2**: 5 exponent bits (bias 15), 2 mantissa bits, IEEE-like infinities and NaNs, largest
//!   finite value 57344, smallest subnormal 2^-16.
//!
//! Encoding rounds to nearest, ties to even, and saturates: any finite value (and infinity) beyond the
//! format's range becomes the largest finite value of that sign, like CUDA's `__NV_SATFINITE`.
//! NaN encodes to the format's canonical NaN with the input's sign.

/// One of the two FP8 formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// 4 exponent bits, 3 mantissa bits, max 448 (the format of weights and activations).
    E4M3,
    /// 5 exponent bits, 2 mantissa bits, max 57344 (a wider-range format some recipes use for gradients).
    E5M2,
}

/// Bit layout of a format, in the form the branch-free encoder needs.
struct Layout {
    man_bits: u32,
    bias: i32,
    max_code: u32,
    nan_code: u8,
}

const E4M3: Layout = Layout {
    man_bits: 3,
    bias: 7,
    max_code: 0x7E,
    nan_code: 0x7F,
};
const E5M2: Layout = Layout {
    man_bits: 2,
    bias: 15,
    max_code: 0x7B,
    nan_code: 0x7E,
};

impl Fp8Format {
    const fn layout(self) -> &'static Layout {
        match self {
            Fp8Format::E4M3 => &E4M3,
            Fp8Format::E5M2 => &E5M2,
        }
    }

    /// The largest finite value.
    pub const fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// The smallest positive normal value.
    pub fn min_normal(self) -> f32 {
        2f32.powi(1 - self.layout().bias)
    }

    /// Number of explicit mantissa bits.
    pub const fn mantissa_bits(self) -> u32 {
        self.layout().man_bits
    }

    /// The distance between `|x|` (assumed within range) and the next representable value above
    /// it: one unit in the last place at that magnitude (the subnormal spacing below `min_normal`).
    pub fn ulp(self, x: f32) -> f32 {
        let l = self.layout();
        let ax = x.abs();
        let exp = if ax < self.min_normal() {
            1 - l.bias
        } else {
            // floor(log2(ax)) for a normal f32 read off its exponent bits.
            ((ax.to_bits() >> 23) as i32) - 127
        };
        2f32.powi(exp - l.man_bits as i32)
    }

    /// Encodes `x`: round to nearest even, saturate to `±max`, NaN to the canonical NaN.
    #[inline(always)]
    pub fn encode(self, x: f32) -> u8 {
        match self {
            Fp8Format::E4M3 => encode_with(&E4M3, x),
            Fp8Format::E5M2 => encode_with(&E5M2, x),
        }
    }

    /// Encodes a value known to be finite (NaN handling is skipped; saturation is kept). Used by
    /// quantization, which has already checked its input; for NaN the result is unspecified.
    #[inline(always)]
    pub fn encode_finite(self, x: f32) -> u8 {
        match self {
            Fp8Format::E4M3 => encode_inner::<false>(&E4M3, x),
            Fp8Format::E5M2 => encode_inner::<false>(&E5M2, x),
        }
    }

    /// Decodes a code to `f32` (exactly: every FP8 value is an `f32` value).
    #[inline(always)]
    pub fn decode(self, code: u8) -> f32 {
        self.table()[code as usize]
    }

    /// The 256-entry decode table of the format.
    pub fn table(self) -> &'static [f32; 256] {
        match self {
            Fp8Format::E4M3 => &E4M3_TABLE,
            Fp8Format::E5M2 => &E5M2_TABLE,
        }
    }

    /// Whether `code` is a NaN of this format.
    pub fn is_nan(self, code: u8) -> bool {
        let abs = code & 0x7F;
        match self {
            Fp8Format::E4M3 => abs == 0x7F,
            Fp8Format::E5M2 => abs > 0x7C,
        }
    }
}

/// The branch-free encoder: both the normal and the subnormal result are computed and one is
/// selected, so loops over slices vectorise.
#[inline(always)]
fn encode_with(l: &Layout, x: f32) -> u8 {
    encode_inner::<true>(l, x)
}

#[inline(always)]
fn encode_inner<const NAN: bool>(l: &Layout, x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let abs = bits & 0x7FFF_FFFF;
    let shift = 23 - l.man_bits;

    // Normal range: round the f32 mantissa to `man_bits` (ties to even) with integer arithmetic,
    // then re-bias the exponent. Overflow of the mantissa carries into the exponent as it should.
    let rounded = abs + ((1 << (shift - 1)) - 1) + ((abs >> shift) & 1);
    let normal = (rounded >> shift).wrapping_sub(((127 - l.bias) as u32) << l.man_bits);

    // Subnormal range: adding a magic constant whose ULP equals the subnormal spacing makes the
    // FPU round (ties to even); the low bits then hold the code. A result of 2^man_bits is the
    // smallest normal, which is also the right code.
    let magic_exp = (127 + 24 - l.bias - l.man_bits as i32) as u32;
    let magic = f32::from_bits(magic_exp << 23);
    let sub = (f32::from_bits(abs) + magic).to_bits() - magic.to_bits();

    let min_normal_bits = ((127 + 1 - l.bias) as u32) << 23;
    let code = if abs < min_normal_bits {
        sub
    } else {
        normal.min(l.max_code)
    };
    let code = if NAN && abs > 0x7F80_0000 {
        l.nan_code as u32
    } else {
        code
    };
    // Combine in 32 bits so that a vectorised loop narrows to bytes only once.
    (sign | code) as u8
}

const fn decode_with(l: &Layout, e5m2: bool, code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let abs = code & 0x7F;
    let man = (abs as u32) & ((1 << l.man_bits) - 1);
    let exp = (abs as u32) >> l.man_bits;
    let max_exp = (1u32 << (7 - l.man_bits)) - 1;
    if e5m2 && exp == max_exp {
        return if man == 0 {
            sign * f32::INFINITY
        } else {
            f32::NAN
        };
    }
    if !e5m2 && abs == 0x7F {
        return f32::NAN;
    }
    if exp == 0 {
        // man * 2^(1 - bias - man_bits), built from bits to stay exact in a const context.
        let spacing = f32::from_bits(((127 + 1 - l.bias - l.man_bits as i32) as u32) << 23);
        return sign * (man as f32) * spacing;
    }
    let bits = ((exp as i32 - l.bias + 127) as u32) << 23 | man << (23 - l.man_bits);
    sign * f32::from_bits(bits)
}

const fn build_table(l: &Layout, e5m2: bool) -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode_with(l, e5m2, i as u8);
        i += 1;
    }
    t
}

static E4M3_TABLE: [f32; 256] = build_table(&E4M3, false);
static E5M2_TABLE: [f32; 256] = build_table(&E5M2, true);

#[cfg(test)]
mod tests {
    use super::*;
    use float8::{F8E4M3, F8E5M2};

    const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

    fn reference(f: Fp8Format, x: f32) -> u8 {
        match f {
            Fp8Format::E4M3 => F8E4M3::from_f32(x).to_bits(),
            Fp8Format::E5M2 => F8E5M2::from_f32(x).to_bits(),
        }
    }

    fn reference_decode(f: Fp8Format, c: u8) -> f32 {
        match f {
            Fp8Format::E4M3 => F8E4M3::from_bits(c).to_f32(),
            Fp8Format::E5M2 => F8E5M2::from_bits(c).to_f32(),
        }
    }

    #[test]
    fn every_code_round_trips() {
        for f in FORMATS {
            for c in 0..=255u8 {
                let v = f.decode(c);
                if f.is_nan(c) {
                    assert!(v.is_nan(), "{f:?} {c:#x}");
                    assert!(f.is_nan(f.encode(v)));
                } else if v.is_infinite() {
                    // E5M2 infinities saturate on encode.
                    assert_eq!(f.encode(v), if v > 0.0 { 0x7B } else { 0xFB });
                } else {
                    assert_eq!(f.encode(v), c, "{f:?} code {c:#x} value {v}");
                }
            }
        }
    }

    #[test]
    fn decode_agrees_with_float8_crate() {
        for f in FORMATS {
            for c in 0..=255u8 {
                let (a, b) = (f.decode(c), reference_decode(f, c));
                assert!(
                    a.is_nan() && b.is_nan() || a == b,
                    "{f:?} {c:#x}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn known_values() {
        let e = Fp8Format::E4M3;
        assert_eq!(e.decode(0x7E), 448.0);
        assert_eq!(e.decode(0x01), 2f32.powi(-9));
        assert_eq!(e.decode(0x08), 2f32.powi(-6));
        assert_eq!(e.decode(0x38), 1.0);
        let e = Fp8Format::E5M2;
        assert_eq!(e.decode(0x7B), 57344.0);
        assert_eq!(e.decode(0x01), 2f32.powi(-16));
        assert_eq!(e.decode(0x7C), f32::INFINITY);
    }

    #[test]
    fn ties_round_to_even() {
        let e = Fp8Format::E4M3;
        // Between 1.0 (0x38) and 1.125 (0x39): the tie goes to the even code 0x38.
        assert_eq!(e.encode(1.0625), 0x38);
        // Between 1.125 (0x39) and 1.25 (0x3A): the tie goes to 0x3A.
        assert_eq!(e.encode(1.1875), 0x3A);
        // Just above a tie rounds up.
        assert_eq!(e.encode(f32::from_bits(1.0625f32.to_bits() + 1)), 0x39);
        // Subnormal ties: 1.5 * 2^-9 lies between codes 1 and 2 -> 2; 2.5 * 2^-9 -> 2.
        assert_eq!(e.encode(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(e.encode(2.5 * 2f32.powi(-9)), 0x02);
        // Half the smallest subnormal ties to zero; just above goes to the smallest subnormal.
        assert_eq!(e.encode(2f32.powi(-10)), 0x00);
        assert_eq!(e.encode(f32::from_bits(2f32.powi(-10).to_bits() + 1)), 0x01);
        // The largest subnormal rounds up into the smallest normal across the boundary.
        assert_eq!(e.encode(7.5 * 2f32.powi(-9)), 0x08);
        let e = Fp8Format::E5M2;
        assert_eq!(e.encode(1.125), 0x3C); // between 1.0 and 1.25, tie to even (1.0)
        assert_eq!(e.encode(1.375), 0x3E); // between 1.25 and 1.5, tie to even (1.5)
    }

    #[test]
    fn saturation() {
        for f in FORMATS {
            let max = f.max();
            let max_code = f.encode(max);
            assert_eq!(f.decode(max_code), max);
            for x in [max * 1.01, max * 2.0, 1e30, f32::INFINITY, f32::MAX] {
                assert_eq!(f.encode(x), max_code, "{f:?} {x}");
                assert_eq!(f.encode(-x), max_code | 0x80, "{f:?} {x}");
            }
        }
        // 464 is the tie between 448 and the (non-existent) 480: even, so 448.
        assert_eq!(Fp8Format::E4M3.encode(464.0), 0x7E);
    }

    #[test]
    fn signed_zero_and_nan() {
        for f in FORMATS {
            assert_eq!(f.encode(0.0), 0x00);
            assert_eq!(f.encode(-0.0), 0x80);
            assert!(f.is_nan(f.encode(f32::NAN)));
            assert!(f.is_nan(f.encode(-f32::NAN)));
            assert_eq!(f.encode(-f32::NAN) & 0x80, 0x80);
            // Below half the smallest subnormal: zero with the sign kept.
            assert_eq!(f.encode(-1e-30), 0x80);
        }
    }

    #[test]
    fn encode_agrees_with_float8_crate_on_a_dense_sweep() {
        // Every f32 whose top 20 bits vary (2^20 values covering every exponent), plus the
        // midpoints between neighbouring FP8 values and their f32 neighbours.
        for f in FORMATS {
            for hi in 0..(1u32 << 20) {
                let x = f32::from_bits(hi << 12 | 0x5A5);
                if x.is_nan() {
                    continue;
                }
                assert_eq!(
                    f.encode(x),
                    reference(f, x),
                    "{f:?} x={x:e} bits={:#x}",
                    x.to_bits()
                );
            }
            let table = f.table();
            for c in 0..0x7Cu8 {
                let (a, b) = (table[c as usize], table[c as usize + 1]);
                if !(a.is_finite() && b.is_finite()) {
                    continue;
                }
                let mid = (a + b) / 2.0;
                for x in [
                    mid,
                    f32::from_bits(mid.to_bits() + 1),
                    f32::from_bits(mid.to_bits() - 1),
                ] {
                    assert_eq!(f.encode(x), reference(f, x), "{f:?} x={x:e}");
                    assert_eq!(f.encode(-x), reference(f, -x), "{f:?} x=-{x:e}");
                }
            }
        }
    }

    #[test]
    fn ulp_matches_table_spacing() {
        for f in FORMATS {
            let t = f.table();
            for c in 0..0x7Au8 {
                let (a, b) = (t[c as usize], t[c as usize + 1]);
                if b.is_finite() {
                    assert_eq!(f.ulp(a), b - a, "{f:?} {c:#x}");
                }
            }
        }
    }
}
