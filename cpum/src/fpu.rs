//! The 512-byte FXSAVE/FXRSTOR image (SDM Vol. 1, §10.5.1, table 10-2).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// One 80-bit x87/MMX register slot, padded to 16 bytes as FXSAVE stores it.
pub type StReg = [u8; 16];
/// One 128-bit XMM register.
pub type XmmReg = [u8; 16];

/// The legacy FXSAVE region (`X86FXSTATE`): 512 bytes, 16-byte aligned.
///
/// The 64-bit form (REX.W FXSAVE64) stores 64-bit FPU IP/DP in place of
/// `fpu_ip`/`fpu_cs` and `fpu_dp`/`fpu_ds`; the field names follow the
/// 32-bit form because that is what both world sides agree on.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct FxSaveArea {
    /// x87 control word (FCW).
    pub fcw: u16,
    /// x87 status word (FSW).
    pub fsw: u16,
    /// Abridged tag word (one bit per register).
    pub ftw: u8,
    /// Reserved.
    pub rsvd1: u8,
    /// Last x87 opcode.
    pub fop: u16,
    /// Last x87 instruction pointer offset.
    pub fpu_ip: u32,
    /// Last x87 instruction pointer selector.
    pub fpu_cs: u16,
    /// Reserved.
    pub rsvd2: u16,
    /// Last x87 data pointer offset.
    pub fpu_dp: u32,
    /// Last x87 data pointer selector.
    pub fpu_ds: u16,
    /// Reserved.
    pub rsvd3: u16,
    /// SSE control/status register.
    pub mxcsr: u32,
    /// Bits of MXCSR the CPU supports.
    pub mxcsr_mask: u32,
    /// ST0–ST7 / MM0–MM7.
    pub st: [StReg; 8],
    /// XMM0–XMM15 (XMM8–15 only meaningful for 64-bit code).
    pub xmm: [XmmReg; 16],
    /// Reserved / available to software.
    pub rsvd4: [u8; 96],
}

/// Size of the FXSAVE image in bytes (`FPUSTATE_SIZE`).
pub const FXSAVE_SIZE: usize = 512;

const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<FxSaveArea>() == FXSAVE_SIZE);
    assert!(align_of::<FxSaveArea>() == 16);
    assert!(offset_of!(FxSaveArea, fcw) == 0);
    assert!(offset_of!(FxSaveArea, fop) == 6);
    assert!(offset_of!(FxSaveArea, fpu_dp) == 16);
    assert!(offset_of!(FxSaveArea, mxcsr) == 24);
    assert!(offset_of!(FxSaveArea, mxcsr_mask) == 28);
    assert!(offset_of!(FxSaveArea, st) == 32);
    assert!(offset_of!(FxSaveArea, xmm) == 160);
    assert!(offset_of!(FxSaveArea, rsvd4) == 416);
};

impl FxSaveArea {
    /// FCW after `FNINIT`.
    pub const FCW_INIT: u16 = 0x037f;
    /// MXCSR after reset.
    pub const MXCSR_INIT: u32 = 0x1f80;

    /// The state `FNINIT` + reset MXCSR would produce.
    pub fn initial() -> Self {
        let mut s = Self::zeroed();
        s.fcw = Self::FCW_INIT;
        s.mxcsr = Self::MXCSR_INIT;
        s.mxcsr_mask = 0xffff;
        s
    }

    /// All-zero image.
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// XMM register `n` as a little-endian u128, or `None` past XMM15.
    pub fn xmm_u128(&self, n: usize) -> Option<u128> {
        self.xmm.get(n).map(|r| u128::from_le_bytes(*r))
    }

    /// Sets XMM register `n` from a little-endian u128; returns `false` past XMM15.
    pub fn set_xmm_u128(&mut self, n: usize, value: u128) -> bool {
        match self.xmm.get_mut(n) {
            Some(r) => {
                *r = value.to_le_bytes();
                true
            }
            None => false,
        }
    }
}

impl Default for FxSaveArea {
    fn default() -> Self {
        Self::initial()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xmm_round_trip_and_bounds() {
        let mut f = FxSaveArea::initial();
        assert!(f.set_xmm_u128(15, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210));
        assert_eq!(
            f.xmm_u128(15),
            Some(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210)
        );
        assert!(!f.set_xmm_u128(16, 1));
        assert_eq!(f.xmm_u128(16), None);
        let bytes = f.as_bytes();
        assert_eq!(&bytes[0..2], &0x037fu16.to_le_bytes());
        assert_eq!(&bytes[24..28], &0x1f80u32.to_le_bytes());
        assert_eq!(bytes[160 + 15 * 16], 0x10);
    }
}
