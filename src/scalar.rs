//! Element types. `Elem` is anything a backend buffer can hold; `Real` is a master
//! precision the math runs in: f32 everywhere, f64 on the CPU (finite-difference tests).
//! bf16 is a storage type for frozen operands only.

use half::bf16;
use std::fmt::Debug;

/// Element types a backend buffer can hold.
pub trait Elem: Copy + Default + Debug + PartialEq + Send + Sync + Unpin + 'static + DeviceElem {
    /// Name used in error messages and kernel suffixes.
    const NAME: &'static str;
}

/// What the CUDA backend needs of an element type (nothing without the `cuda` feature).
#[cfg(feature = "cuda")]
pub trait DeviceElem: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
#[cfg(feature = "cuda")]
impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> DeviceElem for T {}
/// What the CUDA backend needs of an element type (nothing without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub trait DeviceElem {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceElem for T {}

impl Elem for f32 {
    const NAME: &'static str = "f32";
}
impl Elem for f64 {
    const NAME: &'static str = "f64";
}
impl Elem for bf16 {
    const NAME: &'static str = "bf16";
}
impl Elem for u32 {
    const NAME: &'static str = "u32";
}
impl Elem for i32 {
    const NAME: &'static str = "i32";
}
impl Elem for u8 {
    const NAME: &'static str = "u8";
}
impl Elem for u64 {
    const NAME: &'static str = "u64";
}

/// A slice of a concrete [`Real`] type.
pub enum RealSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// A mutable slice of a concrete [`Real`] type.
pub enum RealSliceMut<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

/// A floating-point precision for trainable parameters, optimizer state and accumulation.
pub trait Real:
    Elem
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::iter::Sum
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_bf16(v: bf16) -> Self;
    fn to_bf16(self) -> bf16;
    fn abs(self) -> Self;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn powi(self, n: i32) -> Self;
    fn is_finite(self) -> bool;
    fn max(self, other: Self) -> Self;
    /// An integer key, monotone in `|self|`, for selection by magnitude. NaN sorts above
    /// infinity (it is rejected before selection anyway).
    fn abs_key(self) -> u64;
    /// The slice as its concrete type, so CPU code can dispatch to BLAS/LAPACK safely.
    fn real_slice(s: &[Self]) -> RealSlice<'_>;
    fn real_slice_mut(s: &mut [Self]) -> RealSliceMut<'_>;
    fn from_usize(v: usize) -> Self {
        Self::from_f64(v as f64)
    }
    /// Runs `f` on this thread's reusable scratch of `n` values (contents unspecified),
    /// grown when too small and kept for the next call: per-thread workspaces for CPU
    /// kernels without an allocation per call. A nested call on the same thread gets a
    /// fresh buffer.
    fn with_thread_scratch<R>(n: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! impl_real {
    ($t:ty, $bits:ty, $erf:path, $variant:ident) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn from_bf16(v: bf16) -> Self {
                v.to_f32() as $t
            }
            #[inline]
            fn to_bf16(self) -> bf16 {
                bf16::from_f32(self as f32)
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline]
            fn powi(self, n: i32) -> Self {
                <$t>::powi(self, n)
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn real_slice(s: &[Self]) -> RealSlice<'_> {
                RealSlice::$variant(s)
            }
            fn real_slice_mut(s: &mut [Self]) -> RealSliceMut<'_> {
                RealSliceMut::$variant(s)
            }
            #[inline]
            fn abs_key(self) -> u64 {
                (<$t>::abs(self).to_bits() as $bits) as u64
            }
            fn with_thread_scratch<R>(n: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                thread_local! {
                    static SCRATCH: std::cell::RefCell<Vec<$t>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                SCRATCH.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut buf) => {
                        if buf.len() < n {
                            buf.resize(n, 0.0);
                        }
                        f(&mut buf[..n])
                    }
                    Err(_) => f(&mut vec![0.0; n]),
                })
            }
        }
    };
}

impl_real!(f32, u32, libm::erff, F32);
impl_real!(f64, u64, libm::erf, F64);

/// 64-bit FNV-1a of the values' bits: identifies a basis or a base weight in an adapter.
pub(crate) fn fingerprint<F: Real>(data: &[F]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in data {
        for b in v.to_f64().to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
