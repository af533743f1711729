//! The VM structure and the hypervisor-area (HMA) layout.

use core::mem::{offset_of, size_of};

use cpum::{Cpum, CPUMCPU_SIZE};
use serde::Serialize;
use stam::StamProfileAdv;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `"VMWS"`: marks a VM structure image.
pub const VM_MAGIC: u32 = u32::from_le_bytes(*b"VMWS");
/// Layout version of [`VmHeader`].
pub const VM_VERSION: u32 = 1;
/// Page size.
pub const PAGE: u32 = 0x1000;
/// Pages of hyper stack per VCPU.
pub const STACK_PAGES: u32 = 2;
/// Bytes reserved per VCPU TSS in the TSS page.
pub const TSS_SIZE: u32 = 128;
/// Most VCPUs the hyper GDT and TSS page hold.
pub const MAX_VCPUS: u32 = 32;

/// The fixed head of the VM structure: identification and the switcher's
/// STAM samples, which machine code updates in place through fixups.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct VmHeader {
    /// [`VM_MAGIC`].
    pub magic: u32,
    /// [`VM_VERSION`].
    pub version: u32,
    /// Size of the whole VM structure, VCPUs included.
    pub cb_self: u32,
    /// Number of VCPUs.
    pub cpu_count: u32,
    /// Offset of [`Cpum`] from the VM start.
    pub off_cpum: u32,
    /// RC address of the VM structure (`pVMRC`).
    pub vm_rc: u32,
    /// HC address of the VM structure (`pVMR0`).
    pub vm_hc: u64,
    /// Reserved.
    pub reserved: [u32; 8],
    /// `/VMM/Switcher/ToGC`: host → hypervisor context, in TSC ticks.
    pub stat_switcher_to_gc: StamProfileAdv,
    /// `/VMM/Switcher/ToHC`: hypervisor context → host, in TSC ticks.
    pub stat_switcher_to_hc: StamProfileAdv,
    /// Padding to a 64-byte multiple.
    pub pad: [u8; 48],
}

/// The fixed part of the VM structure; the `CpumCpu32` array follows `cpum`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct VmFixed {
    /// Identification and switcher statistics.
    pub header: VmHeader,
    /// VM-wide CPUM data.
    pub cpum: Cpum,
}

/// Offset of `Cpum` in the VM structure.
pub const OFF_CPUM: usize = offset_of!(VmFixed, cpum);
/// Offset of the ToGC profile.
pub const OFF_STAT_TO_GC: usize = offset_of!(VmFixed, header.stat_switcher_to_gc);
/// Offset of the ToHC profile.
pub const OFF_STAT_TO_HC: usize = offset_of!(VmFixed, header.stat_switcher_to_hc);
/// Offset of VCPU 0's `CpumCpu32` from `Cpum`.
pub const OFF_CPUMCPU0: usize = size_of::<Cpum>();

const _: () = {
    assert!(size_of::<VmHeader>() == 192);
    assert!(size_of::<VmFixed>() == 256);
    assert!(OFF_STAT_TO_GC % 8 == 0 && OFF_STAT_TO_HC % 8 == 0);
    // CPUMCPU must stay 64-byte aligned for its FXSAVE images.
    assert!((OFF_CPUM + OFF_CPUMCPU0) % 64 == 0);
};

/// Size of the VM structure for `vcpus` VCPUs, or `None` if it does not fit
/// in 32 bits.
pub const fn vm_size(vcpus: u32) -> Option<u32> {
    match off_cpumcpu(vcpus) {
        Some(end) => end.checked_add(OFF_CPUM as u32),
        None => None,
    }
}

/// Byte offset of VCPU `i`'s `CpumCpu32` from `Cpum` (the C entry's second
/// argument), or `None` if it does not fit in 32 bits.
pub const fn off_cpumcpu(i: u32) -> Option<u32> {
    match i.checked_mul(CPUMCPU_SIZE as u32) {
        Some(o) => o.checked_add(OFF_CPUMCPU0 as u32),
        None => None,
    }
}

/// A layout the 32-bit HMA cannot hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} of {value:#x} does not fit the 32-bit hypervisor area")]
pub struct LayoutError {
    /// Which quantity.
    pub what: &'static str,
    /// Its value (a count of VCPUs or pages).
    pub value: u64,
}

/// Offsets (from the HMA start) of everything in the hypervisor area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HmaLayout {
    /// VM structure.
    pub vm: u32,
    /// VM structure size.
    pub vm_size: u32,
    /// Hyper GDT page.
    pub gdt: u32,
    /// Hyper TSS page (one 128-byte TSS per VCPU).
    pub tss: u32,
    /// Hyper IDT page (256 gates of 8 bytes).
    pub idt: u32,
    /// First VCPU's stack (each is [`STACK_PAGES`] pages).
    pub stacks: u32,
    /// Helper-code area.
    pub helper: u32,
    /// Helper-code area size.
    pub helper_size: u32,
    /// Size of the whole area.
    pub size: u32,
}

impl HmaLayout {
    /// The layout for `vcpus` VCPUs and `helper_pages` pages of helper code.
    ///
    /// # Errors
    /// [`LayoutError`] when `vcpus` is past [`MAX_VCPUS`] or the area does
    /// not fit in 32 bits.
    pub fn new(vcpus: u32, helper_pages: u32) -> Result<Self, LayoutError> {
        if vcpus > MAX_VCPUS {
            return Err(LayoutError {
                what: "VCPU count",
                value: u64::from(vcpus),
            });
        }
        let too_large = |what: &'static str, value: u32| LayoutError {
            what,
            value: u64::from(value),
        };
        let vm_size = vm_size(vcpus).ok_or(too_large("VCPU count", vcpus))?;
        let gdt = vm_size.div_ceil(PAGE) * PAGE;
        let tss = gdt + PAGE;
        let idt = tss + PAGE;
        let stacks = idt + PAGE;
        // At most 32 VCPUs: every offset up to here is far below 4 GiB.
        let helper = stacks + vcpus * STACK_PAGES * PAGE;
        let helper_size = helper_pages
            .checked_mul(PAGE)
            .ok_or(too_large("helper area", helper_pages))?;
        let size = helper
            .checked_add(helper_size)
            .ok_or(too_large("helper area", helper_pages))?;
        Ok(Self {
            vm: 0,
            vm_size,
            gdt,
            tss,
            idt,
            stacks,
            helper,
            helper_size,
            size,
        })
    }

    /// Offset of VCPU `i`'s TSS, or `None` if it lies past the TSS page.
    pub fn tss_of(&self, i: u32) -> Option<u32> {
        let off = i.checked_mul(TSS_SIZE)?;
        (off < PAGE).then(|| self.tss + off)
    }

    /// Offset of the top of VCPU `i`'s stack, or `None` if VCPU `i` has no
    /// stack in this layout.
    pub fn stack_top(&self, i: u32) -> Option<u32> {
        let top = i
            .checked_add(1)?
            .checked_mul(STACK_PAGES * PAGE)?
            .checked_add(self.stacks)?;
        (top <= self.helper).then_some(top)
    }
}

/// The hypervisor selectors of the hyper GDT this core builds.
pub mod sel {
    /// 32-bit flat code.
    pub const CS: u16 = 0x08;
    /// Flat data.
    pub const DS: u16 = 0x10;
    /// 64-bit code.
    pub const CS64: u16 = 0x18;
    /// TSS of VCPU 0; VCPU *i* has `TSS + i * cpum::HYPER_TSS_STRIDE` (16-byte
    /// slots, so each also holds a 64-bit TSS descriptor).
    pub const TSS: u16 = 0x20;

    /// TSS selector of VCPU `i` (a `u8`, so every value has a selector).
    pub const fn tss(i: u8) -> u16 {
        TSS + (i as u16) * cpum::HYPER_TSS_STRIDE
    }

    /// TSS selector of VCPU `i`, or `None` past [`crate::layout::MAX_VCPUS`].
    pub const fn try_tss(i: u32) -> Option<u16> {
        if i < super::MAX_VCPUS {
            Some(tss(i as u8))
        } else {
            None
        }
    }

    /// GDT limit for `vcpus` VCPUs.
    pub const fn gdt_limit(vcpus: u8) -> u16 {
        tss(vcpus) - 1
    }
}

/// A 32-bit available-TSS descriptor (type 9) for `base`, in a 16-byte slot.
pub fn tss_descriptor(base: u32) -> [u64; 2] {
    let limit = 103u64;
    let base = u64::from(base);
    let d = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | ((base >> 24) << 56);
    [d, 0]
}

/// The hyper GDT: null, CS, DS, CS64, then one TSS descriptor per VCPU.
pub fn hyper_gdt(tss_rc: impl Fn(u32) -> u32, vcpus: u8) -> Vec<u64> {
    let mut g = vec![
        0,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_9a00_0000_ffff,
    ];
    for i in 0..u32::from(vcpus) {
        g.extend(tss_descriptor(tss_rc(i)));
    }
    g
}

/// The words `CPUMPushHyper` leaves on the hyper stack for the call
/// trampoline, lowest address first: target, argument byte count, then the
/// arguments in cdecl order. The byte count saturates at `u32::MAX`; callers
/// bound `args` by the stack they push it on.
pub fn trampoline_frame(target: u32, args: &[u32]) -> Vec<u32> {
    let bytes = args
        .len()
        .checked_mul(4)
        .and_then(|b| u32::try_from(b).ok())
        .unwrap_or(u32::MAX);
    let mut v = vec![target, bytes];
    v.extend_from_slice(args);
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_page_granular_and_ordered() {
        let l = HmaLayout::new(2, 4).unwrap();
        assert_eq!(l.vm_size, 256 + 2 * 2624);
        assert_eq!(l.gdt, 0x2000);
        assert_eq!(l.tss, 0x3000);
        assert_eq!(l.idt, 0x4000);
        assert_eq!(l.stacks, 0x5000);
        assert_eq!(l.stack_top(1), Some(0x9000));
        assert_eq!(l.stack_top(2), None);
        assert_eq!(l.helper, 0x9000);
        assert_eq!(l.size, 0xd000);
        assert_eq!(l.tss_of(1), Some(0x3080));
        assert_eq!(off_cpumcpu(1), Some(64 + 2624));
        assert_eq!(off_cpumcpu(u32::MAX), None);
        assert_eq!(vm_size(u32::MAX), None);
    }

    #[test]
    fn gdt_has_one_tss_per_vcpu() {
        let g = hyper_gdt(|i| 0xa000_3000 + i * 128, 3);
        assert_eq!(g.len(), 4 + 6);
        assert_eq!(sel::tss(2), 0x40);
        assert_eq!(sel::gdt_limit(3), 0x4f);
        let d = g[usize::from(sel::tss(1)) / 8];
        assert_eq!((d >> 40) & 0xff, 0x89);
        assert_eq!(((d >> 16) & 0xff_ffff) | ((d >> 56) << 24), 0xa000_3080);
        assert_eq!(d & 0xffff, 103);
        assert_eq!(
            trampoline_frame(0xa000_9000, &[1, 2]),
            vec![0xa000_9000, 8, 1, 2]
        );
    }
}
