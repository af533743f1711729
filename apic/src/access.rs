//! Register access: the [`ApicAccess`] trait and its three back ends.

use crate::{x2apic_msr, X2APIC_MSR_BASE};

/// Bytes of the xAPIC page that hold registers (offsets `0x000..0x400`).
pub const XAPIC_REGISTER_SPAN: u32 = 0x400;

/// Read and write local APIC registers by their xAPIC offset.
///
/// The same offsets ([`crate::reg`]) address both modes: an xAPIC back end
/// reads the MMIO page, an x2APIC back end the MSR `0x800 + offset/16`.
pub trait ApicAccess {
    /// Why an access failed.
    type Error;

    /// Read the 32-bit register at `xapic_offset`.
    ///
    /// # Errors
    ///
    /// When the offset is not a register or the back end cannot reach it.
    fn read(&mut self, xapic_offset: u32) -> Result<u32, Self::Error>;

    /// Write the 32-bit register at `xapic_offset`.
    ///
    /// # Errors
    ///
    /// When the offset is not a register or the back end cannot reach it.
    fn write(&mut self, xapic_offset: u32, value: u32) -> Result<(), Self::Error>;
}

impl<A: ApicAccess + ?Sized> ApicAccess for &mut A {
    type Error = A::Error;

    fn read(&mut self, xapic_offset: u32) -> Result<u32, Self::Error> {
        (**self).read(xapic_offset)
    }

    fn write(&mut self, xapic_offset: u32, value: u32) -> Result<(), Self::Error> {
        (**self).write(xapic_offset, value)
    }
}

/// An xAPIC offset that names no register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum OffsetError {
    /// Registers sit on 16-byte boundaries.
    #[error("APIC register offset {offset:#x} is not 16-byte aligned")]
    Misaligned {
        /// The offending offset.
        offset: u32,
    },
    /// Registers end at offset 0x3f0.
    #[error("APIC register offset {offset:#x} is beyond the register area (0x000..0x400)")]
    OutOfRange {
        /// The offending offset.
        offset: u32,
    },
}

/// Check that `xapic_offset` is a register slot: 16-byte aligned and below
/// [`XAPIC_REGISTER_SPAN`]. Returns the slot index (`offset / 16`).
///
/// # Errors
///
/// [`OffsetError`] naming the offset.
pub const fn check_offset(xapic_offset: u32) -> Result<usize, OffsetError> {
    if xapic_offset % 16 != 0 {
        Err(OffsetError::Misaligned {
            offset: xapic_offset,
        })
    } else if xapic_offset >= XAPIC_REGISTER_SPAN {
        Err(OffsetError::OutOfRange {
            offset: xapic_offset,
        })
    } else {
        Ok((xapic_offset / 16) as usize)
    }
}

/// The xAPIC register page given to [`XApicMmio::new`] is too short.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("xAPIC page of {len} bytes is shorter than the 0x400-byte register area")]
pub struct XApicPageError {
    /// Length of the buffer that was given.
    pub len: usize,
}

/// xAPIC access over a byte image of the APIC page (little-endian, one u32
/// per 16-byte slot).
///
/// This models the MMIO page as plain memory: a copy in a VM image, a dump,
/// or a test fixture. It does no volatile access; live hardware is reached by
/// the switcher's machine code, not through this type.
#[derive(Debug)]
pub struct XApicMmio<P> {
    page: P,
}

impl<P: AsRef<[u8]> + AsMut<[u8]>> XApicMmio<P> {
    /// Wrap a page buffer (normally 4 KiB).
    ///
    /// # Errors
    ///
    /// [`XApicPageError`] when the buffer is shorter than the 0x400-byte register area.
    pub fn new(page: P) -> Result<Self, XApicPageError> {
        let len = page.as_ref().len();
        if len < XAPIC_REGISTER_SPAN as usize {
            return Err(XApicPageError { len });
        }
        Ok(Self { page })
    }

    /// The underlying buffer.
    pub fn page(&self) -> &P {
        &self.page
    }

    /// Give the buffer back.
    pub fn into_inner(self) -> P {
        self.page
    }
}

impl<P: AsRef<[u8]> + AsMut<[u8]>> ApicAccess for XApicMmio<P> {
    type Error = OffsetError;

    fn read(&mut self, xapic_offset: u32) -> Result<u32, OffsetError> {
        let start = check_offset(xapic_offset)? * 16;
        let bytes = self
            .page
            .as_ref()
            .get(start..start + 4)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .ok_or(OffsetError::OutOfRange {
                offset: xapic_offset,
            })?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn write(&mut self, xapic_offset: u32, value: u32) -> Result<(), OffsetError> {
        let start = check_offset(xapic_offset)? * 16;
        let slot = self
            .page
            .as_mut()
            .get_mut(start..start + 4)
            .ok_or(OffsetError::OutOfRange {
                offset: xapic_offset,
            })?;
        slot.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}

/// Model-specific register access (`rdmsr`/`wrmsr`), as the x2APIC needs it.
pub trait MsrAccess {
    /// Why an access failed (for example a #GP on a real CPU).
    type Error;

    /// Read MSR `msr` (EDX:EAX).
    ///
    /// # Errors
    ///
    /// When the MSR cannot be read.
    fn read_msr(&mut self, msr: u32) -> Result<u64, Self::Error>;

    /// Write MSR `msr` (EDX:EAX).
    ///
    /// # Errors
    ///
    /// When the MSR cannot be written.
    fn write_msr(&mut self, msr: u32, value: u64) -> Result<(), Self::Error>;
}

/// Why an x2APIC register access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum X2ApicError<E> {
    /// The xAPIC offset names no register.
    #[error(transparent)]
    Offset(#[from] OffsetError),
    /// The MSR access itself failed.
    #[error("access to x2APIC MSR {msr:#x} failed")]
    Msr {
        /// The MSR that was accessed.
        msr: u32,
        /// What the MSR back end reported.
        #[source]
        source: E,
    },
}

/// x2APIC access: register `offset` is MSR `0x800 + offset/16`.
///
/// Registers are 32 bits in EAX. A write keeps EDX from the last read of the
/// same MSR, as VirtualBox's `rdmsr; or eax, MASKED; wrmsr` does, and writes
/// EDX = 0 otherwise (the LVT MSRs' high half is reserved as zero). A write
/// never reads first, so write-only MSRs such as EOI stay write-only.
#[derive(Debug)]
pub struct X2Apic<M> {
    msrs: M,
    last_read: Option<(u32, u32)>,
}

impl<M: MsrAccess> X2Apic<M> {
    /// Access the x2APIC through `msrs`.
    pub fn new(msrs: M) -> Self {
        Self {
            msrs,
            last_read: None,
        }
    }

    /// The MSR back end.
    pub fn msrs(&self) -> &M {
        &self.msrs
    }

    /// Give the MSR back end back.
    pub fn into_inner(self) -> M {
        self.msrs
    }
}

impl<M: MsrAccess> ApicAccess for X2Apic<M> {
    type Error = X2ApicError<M::Error>;

    fn read(&mut self, xapic_offset: u32) -> Result<u32, Self::Error> {
        check_offset(xapic_offset)?;
        let msr = x2apic_msr(xapic_offset);
        let value = self
            .msrs
            .read_msr(msr)
            .map_err(|source| X2ApicError::Msr { msr, source })?;
        self.last_read = Some((msr, (value >> 32) as u32));
        Ok(value as u32)
    }

    fn write(&mut self, xapic_offset: u32, value: u32) -> Result<(), Self::Error> {
        check_offset(xapic_offset)?;
        let msr = x2apic_msr(xapic_offset);
        let high = match self.last_read {
            Some((read_msr, high)) if read_msr == msr => high,
            _ => 0,
        };
        self.msrs
            .write_msr(msr, (u64::from(high) << 32) | u64::from(value))
            .map_err(|source| X2ApicError::Msr { msr, source })
    }
}

const REGISTER_SLOTS: usize = (XAPIC_REGISTER_SPAN / 16) as usize;
const _: () = assert!(x2apic_msr(XAPIC_REGISTER_SPAN - 16) == X2APIC_MSR_BASE + 0x3f);

/// An in-memory register file: one u32 per xAPIC register slot, with access
/// counters. No allocation; for tests and for planning what a switcher will do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterFile {
    regs: [u32; REGISTER_SLOTS],
    reads: u32,
    writes: u32,
}

impl Default for RegisterFile {
    fn default() -> Self {
        Self::new()
    }
}

impl RegisterFile {
    /// All registers zero, counters zero.
    pub const fn new() -> Self {
        Self {
            regs: [0; REGISTER_SLOTS],
            reads: 0,
            writes: 0,
        }
    }

    /// Value of a register, without counting an access.
    ///
    /// # Errors
    ///
    /// [`OffsetError`] when `xapic_offset` is not a register slot.
    pub fn get(&self, xapic_offset: u32) -> Result<u32, OffsetError> {
        let i = check_offset(xapic_offset)?;
        self.regs.get(i).copied().ok_or(OffsetError::OutOfRange {
            offset: xapic_offset,
        })
    }

    /// Set a register, without counting an access.
    ///
    /// # Errors
    ///
    /// [`OffsetError`] when `xapic_offset` is not a register slot.
    pub fn set(&mut self, xapic_offset: u32, value: u32) -> Result<(), OffsetError> {
        let i = check_offset(xapic_offset)?;
        let slot = self.regs.get_mut(i).ok_or(OffsetError::OutOfRange {
            offset: xapic_offset,
        })?;
        *slot = value;
        Ok(())
    }

    /// Number of [`ApicAccess::read`] calls that succeeded.
    pub fn reads(&self) -> u32 {
        self.reads
    }

    /// Number of [`ApicAccess::write`] calls that succeeded.
    pub fn writes(&self) -> u32 {
        self.writes
    }
}

impl ApicAccess for RegisterFile {
    type Error = OffsetError;

    fn read(&mut self, xapic_offset: u32) -> Result<u32, OffsetError> {
        let v = self.get(xapic_offset)?;
        self.reads += 1;
        Ok(v)
    }

    fn write(&mut self, xapic_offset: u32, value: u32) -> Result<(), OffsetError> {
        self.set(xapic_offset, value)?;
        self.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::reg;
    use std::string::ToString;

    const ALL_REGS: [(u32, u32); 12] = [
        (reg::ID, 0x802),
        (reg::VERSION, 0x803),
        (reg::TPR, 0x808),
        (reg::EOI, 0x80b),
        (reg::SVR, 0x80f),
        (reg::LVT_CMCI, 0x82f),
        (reg::LVT_TIMER, 0x832),
        (reg::LVT_THMR, 0x833),
        (reg::LVT_PC, 0x834),
        (reg::LVT_LINT0, 0x835),
        (reg::LVT_LINT1, 0x836),
        (reg::LVT_ERR, 0x837),
    ];

    const BAD_OFFSETS: [(u32, OffsetError); 7] = [
        (0x004, OffsetError::Misaligned { offset: 0x004 }),
        (0x358, OffsetError::Misaligned { offset: 0x358 }),
        (0x3ff, OffsetError::Misaligned { offset: 0x3ff }),
        (0x400, OffsetError::OutOfRange { offset: 0x400 }),
        (0xff0, OffsetError::OutOfRange { offset: 0xff0 }),
        (0x1000, OffsetError::OutOfRange { offset: 0x1000 }),
        (
            0xffff_fff0,
            OffsetError::OutOfRange {
                offset: 0xffff_fff0,
            },
        ),
    ];

    /// An MSR file over the x2APIC range with an access log.
    #[derive(Debug)]
    struct Msrs {
        values: [u64; 0x40],
        log: [(bool, u32, u64); 8],
        n: usize,
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Gp(u32);

    impl Default for Msrs {
        fn default() -> Self {
            Self {
                values: [0; 0x40],
                log: [(false, 0, 0); 8],
                n: 0,
            }
        }
    }

    impl Msrs {
        fn slot(msr: u32) -> Result<usize, Gp> {
            match msr.checked_sub(X2APIC_MSR_BASE) {
                Some(i) if i < 0x40 => Ok(i as usize),
                _ => Err(Gp(msr)),
            }
        }
        fn record(&mut self, write: bool, msr: u32, value: u64) {
            if let Some(slot) = self.log.get_mut(self.n) {
                *slot = (write, msr, value);
            }
            self.n += 1;
        }
    }

    impl MsrAccess for Msrs {
        type Error = Gp;
        fn read_msr(&mut self, msr: u32) -> Result<u64, Gp> {
            let v = self.values[Self::slot(msr)?];
            self.record(false, msr, v);
            Ok(v)
        }
        fn write_msr(&mut self, msr: u32, value: u64) -> Result<(), Gp> {
            self.values[Self::slot(msr)?] = value;
            self.record(true, msr, value);
            Ok(())
        }
    }

    #[test]
    fn x2apic_msr_for_every_register() {
        for (offset, msr) in ALL_REGS {
            assert_eq!(x2apic_msr(offset), msr, "offset {offset:#x}");
        }
        // Every slot maps one-to-one onto 0x800..=0x83f.
        for slot in 0..0x40u32 {
            assert_eq!(x2apic_msr(slot * 16), 0x800 + slot);
        }
    }

    #[test]
    fn x2apic_reads_and_writes_the_mapped_msr() {
        let mut apic = X2Apic::new(Msrs::default());
        for (i, (offset, msr)) in ALL_REGS.into_iter().enumerate() {
            let value = 0x1000_0000 + i as u32;
            apic.write(offset, value).unwrap();
            assert_eq!(apic.msrs().values[(msr - 0x800) as usize], u64::from(value));
            assert_eq!(apic.read(offset).unwrap(), value);
        }
    }

    #[test]
    fn x2apic_write_keeps_edx_from_the_preceding_read_of_that_msr() {
        let mut msrs = Msrs::default();
        msrs.values[0x35] = 0xdead_beef_0000_0400;
        let mut apic = X2Apic::new(msrs);
        let v = apic.read(reg::LVT_LINT0).unwrap();
        assert_eq!(v, 0x400);
        apic.write(reg::LVT_LINT0, v | crate::lvt::MASKED).unwrap();
        assert_eq!(apic.msrs().values[0x35], 0xdead_beef_0001_0400);
        // A write not preceded by a read of the same MSR writes EDX = 0 and
        // does not read first (EOI is write-only).
        apic.write(reg::EOI, 0).unwrap();
        let msrs = apic.into_inner();
        assert_eq!(msrs.n, 3);
        assert_eq!(msrs.log[2], (true, 0x80b, 0));
    }

    #[test]
    fn x2apic_errors_name_the_msr_or_offset() {
        #[derive(Debug)]
        struct Failing;
        impl MsrAccess for Failing {
            type Error = Gp;
            fn read_msr(&mut self, msr: u32) -> Result<u64, Gp> {
                Err(Gp(msr))
            }
            fn write_msr(&mut self, msr: u32, _: u64) -> Result<(), Gp> {
                Err(Gp(msr))
            }
        }
        let mut apic = X2Apic::new(Failing);
        assert_eq!(
            apic.read(reg::LVT_PC),
            Err(X2ApicError::Msr {
                msr: 0x834,
                source: Gp(0x834)
            })
        );
        assert_eq!(
            apic.write(reg::LVT_CMCI, 0),
            Err(X2ApicError::Msr {
                msr: 0x82f,
                source: Gp(0x82f)
            })
        );
        for (offset, err) in BAD_OFFSETS {
            assert_eq!(apic.read(offset), Err(X2ApicError::Offset(err)));
            assert_eq!(apic.write(offset, 0), Err(X2ApicError::Offset(err)));
        }
    }

    #[test]
    fn xapic_mmio_is_little_endian_at_the_offset() {
        let mut page = [0u8; 4096];
        let mut apic = XApicMmio::new(&mut page[..]).unwrap();
        apic.write(reg::LVT_LINT1, 0x0001_0400).unwrap();
        apic.write(reg::LVT_ERR, 0xaabb_ccdd).unwrap();
        assert_eq!(apic.read(reg::LVT_LINT1).unwrap(), 0x0001_0400);
        let _ = apic.into_inner();
        assert_eq!(&page[0x360..0x364], &[0x00, 0x04, 0x01, 0x00]);
        assert_eq!(&page[0x370..0x374], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert!(page[0x364..0x370].iter().all(|&b| b == 0));
    }

    #[test]
    fn xapic_mmio_rejects_bad_offsets_without_touching_the_page() {
        let mut apic = XApicMmio::new([0u8; 4096]).unwrap();
        for (offset, err) in BAD_OFFSETS {
            assert_eq!(apic.read(offset), Err(err));
            assert_eq!(apic.write(offset, u32::MAX), Err(err));
        }
        assert!(apic.into_inner().iter().all(|&b| b == 0));
        assert_eq!(
            OffsetError::Misaligned { offset: 0x358 }.to_string(),
            "APIC register offset 0x358 is not 16-byte aligned"
        );
    }

    #[test]
    fn xapic_mmio_page_length() {
        assert_eq!(
            XApicMmio::new([0u8; 0x3ff]).err(),
            Some(XApicPageError { len: 0x3ff })
        );
        let mut apic = XApicMmio::new([0u8; 0x400]).unwrap();
        apic.write(0x3f0, 7).unwrap();
        assert_eq!(apic.read(0x3f0), Ok(7));
    }

    #[test]
    fn register_file_counts_and_checks() {
        let mut regs = RegisterFile::new();
        regs.write(reg::SVR, 0x1ff).unwrap();
        assert_eq!(regs.read(reg::SVR), Ok(0x1ff));
        assert_eq!(regs.get(reg::SVR), Ok(0x1ff));
        assert_eq!((regs.reads(), regs.writes()), (1, 1));
        for (offset, err) in BAD_OFFSETS {
            assert_eq!(regs.read(offset), Err(err));
            assert_eq!(regs.set(offset, 1), Err(err));
        }
        assert_eq!((regs.reads(), regs.writes()), (1, 1));
        assert_eq!(regs, {
            let mut r = RegisterFile::new();
            r.set(reg::SVR, 0x1ff).unwrap();
            r.reads = 1;
            r.writes = 1;
            r
        });
    }
}
