//! Bad input is refused with typed errors, never a panic: relocation at the
//! ends of the address spaces, definitions with bad regions, arbitrary fixup
//! streams and mutated switcher definitions; and the listing's annotations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::OnceLock;

use common::{ctx, VM};
use proptest::prelude::*;
use vmm_switcher::disasm::{self, DisasmError};
use vmm_switcher::reloc::{CpuFacts, HyperSelectors, InterCr3};
use vmm_switcher::templates::{
    amd64_amd64, amd64_legacy, legacy_amd64, legacy_pae, stub, Step, TemplateOptions,
};
use vmm_switcher::{
    fixup, relocate, FixupKind, FixupRecord, HcAddr, PhysAddr, RcAddr, RelocContext, RelocError,
    SwitcherDef,
};

fn legacy32_to_amd64(o: &TemplateOptions) -> SwitcherDef {
    legacy_amd64::build(legacy_amd64::HostPaging::Legacy32, o, &VM).unwrap()
}

fn amd64_to_pae() -> SwitcherDef {
    amd64_legacy::build(legacy_pae::Flavour::Pae, &TemplateOptions::default(), &VM).unwrap()
}

fn reloc(def: &SwitcherDef, c: &RelocContext) -> Result<Vec<u8>, RelocError> {
    let mut code = def.code.clone();
    relocate(def, &mut code, c).map(|_| code)
}

#[test]
fn hc_code_near_i64_max_and_u64_max_is_a_typed_error() {
    let def32 = legacy32_to_amd64(&TemplateOptions::default());
    let def64 = amd64_to_pae();
    for def in [&def32, &def64] {
        // The code's last byte would lie past 2^64.
        for hc in [u64::MAX - 0x100, u64::MAX - 3, u64::MAX] {
            let mut c = ctx();
            c.code_hc = HcAddr(hc);
            let e = reloc(def, &c).unwrap_err();
            assert!(
                matches!(e, RelocError::AddressOverflow { what: "HC code", base, bits: 64, .. } if base == hc),
                "{:?} at {hc:#x}: {e:?}",
                def.kind
            );
            assert!(e.to_string().contains(&format!("{hc:#x}")), "{e}");
        }
    }
    // Around i64::MAX: addresses fit u64, but no rel32 from the 32-bit host
    // code reaches them. (The AMD64-host code reaches other views through
    // 64-bit slots and far pointers, so it relocates there.)
    for def in [&def32, &def64] {
        // The first rel32 field exactly at i64::MAX: its end (`addr + 4`) is past it.
        let rel_off = def
            .fixups
            .iter()
            .find(|f| f.kind == FixupKind::Hc2IdNearRel)
            .map_or(0, |f| u64::from(f.off));
        let at_max = (i64::MAX as u64) - rel_off;
        for hc in [
            0x7fff_ffff_ffff_f000,
            at_max,
            at_max - 2,
            0x8000_0000_0000_0000,
        ] {
            let mut c = ctx();
            c.code_hc = HcAddr(hc);
            let Err(e) = reloc(def, &c) else {
                assert_eq!(def.kind, def64.kind);
                continue;
            };
            assert!(
                matches!(
                    e,
                    RelocError::ValueTooWide { .. } | RelocError::Rel32OutOfRange { .. }
                ),
                "{:?} at {hc:#x}: {e:?}",
                def.kind
            );
        }
    }
}

#[test]
fn vm_and_cpum_areas_that_wrap_are_refused() {
    let def64 = amd64_to_pae();
    // The VM structure (and the CPUM area in it) would run past 2^64: the
    // HC CPUM address the switcher stores would name a wrapped area.
    let mut c = ctx();
    c.code_hc = HcAddr(0xffff_ffff_ffef_f000);
    c.vm_hc = HcAddr(0xffff_ffff_ffff_f000);
    let e = reloc(&def64, &c).unwrap_err();
    assert!(
        matches!(
            e,
            RelocError::AddressOverflow {
                what: "HC VM structure",
                base: 0xffff_ffff_ffff_f000,
                bits: 64,
                ..
            }
        ),
        "{e:?}"
    );
    // RC: the VM structure must end at or below 4 GiB.
    let mut c = ctx();
    c.vm_rc = RcAddr(0xffff_f000);
    assert!(matches!(
        reloc(&def64, &c).unwrap_err(),
        RelocError::AddressOverflow {
            what: "RC VM structure",
            bits: 32,
            ..
        }
    ));
    // RC code whose last byte would be past 4 GiB.
    let mut c = ctx();
    c.code_rc = RcAddr(0xffff_ff00);
    assert!(matches!(
        reloc(&def64, &c).unwrap_err(),
        RelocError::AddressOverflow {
            what: "RC code",
            ..
        }
    ));
    // Identity code whose last byte would be past 4 GiB.
    let mut c = ctx();
    c.code_id = PhysAddr(0xffff_ff00);
    assert!(matches!(
        reloc(&def64, &c).unwrap_err(),
        RelocError::AddressOverflow {
            what: "identity code",
            ..
        }
    ));
}

#[test]
fn regions_and_entries_outside_the_code_are_refused() {
    let def = legacy32_to_amd64(&TemplateOptions::default());
    let c = ctx();
    for bits in [0, 8, 16, 33, 128] {
        let mut d = def.clone();
        d.regions[0].bits = bits;
        assert!(
            matches!(reloc(&d, &c).unwrap_err(), RelocError::BadRegion { bits: b, .. } if b == bits),
            "{bits}"
        );
    }
    let mut d = def.clone();
    d.regions[1].range.end = def.code_len() + 1;
    assert!(matches!(
        reloc(&d, &c).unwrap_err(),
        RelocError::BadRegion { .. }
    ));
    let mut d = def.clone();
    d.entries.rc_call_trampoline = u32::MAX;
    assert!(matches!(
        reloc(&d, &c).unwrap_err(),
        RelocError::EntryOutsideCode {
            name: "GCCallTrampoline",
            off: u32::MAX,
            ..
        }
    ));
}

#[test]
fn listing_refuses_a_region_of_no_x86_bitness() {
    let def = legacy32_to_amd64(&TemplateOptions::default());
    let c = ctx();
    let mut code = def.code.clone();
    let rel = relocate(&def, &mut code, &c).unwrap();
    for bits in [0, 8, 24, 128] {
        let mut d = def.clone();
        d.regions[2].bits = bits;
        let name = d.regions[2].name;
        assert_eq!(
            disasm::lines(&d, &code, &c, &rel).unwrap_err(),
            DisasmError::Bitness { name, bits }
        );
        assert!(disasm::listing(&d, &code, &c, &rel).is_err());
    }
    // 16-bit regions decode.
    let mut d = def.clone();
    d.regions[2].bits = 16;
    assert!(disasm::lines(&d, &code, &c, &rel).is_ok());
    // Wrong code size, regions past the code, addresses past the view.
    assert!(matches!(
        disasm::lines(&def, &code[1..], &c, &rel),
        Err(DisasmError::CodeSize { .. })
    ));
    let mut d = def.clone();
    d.regions[0].range.end = u32::MAX;
    assert!(matches!(
        disasm::lines(&d, &code, &c, &rel),
        Err(DisasmError::RegionOutsideCode { .. })
    ));
    let mut far = c;
    far.code_hc = HcAddr(0x1_0000_0000);
    assert!(matches!(
        disasm::lines(&def, &code, &far, &rel),
        Err(DisasmError::AddressOverflow { bits: 32, .. })
    ));
    far.code_hc = HcAddr(u64::MAX - 0x10);
    assert!(matches!(
        disasm::lines(&def, &code, &far, &rel),
        Err(DisasmError::AddressOverflow { .. })
    ));
}

fn listing_of(def: &SwitcherDef) -> String {
    let c = ctx();
    let mut code = def.code.clone();
    let rel = relocate(def, &mut code, &c).unwrap();
    disasm::listing(def, &code, &c, &rel).unwrap()
}

#[test]
fn listing_names_trace_steps_and_crash_markers() {
    let o = TemplateOptions {
        trace: true,
        crash_markers: true,
        ..TemplateOptions::default()
    };
    let def = legacy32_to_amd64(&o);
    let text = listing_of(&def);
    assert!(
        text.contains("; trace 'E' InterCr3: intermediate CR3 loaded"),
        "{text}"
    );
    // Every step the round trip prints is named where the code prints it.
    for step in legacy_amd64::trace_steps(&o) {
        let want = format!(
            "; trace '{}' {step:?}: {}",
            char::from(step.ch()),
            step.describe()
        );
        assert!(text.contains(&want), "missing {want}");
    }
    // Every COM1 write of the trace is annotated.
    let outs = text
        .lines()
        .filter(|l| l.contains(" out     dx,al"))
        .count();
    let traces = text.lines().filter(|l| l.contains("; trace '")).count();
    assert_eq!(outs, traces);
    assert!(outs >= legacy_amd64::trace_steps(&o).len());
    assert!(text.contains("; crash marker 1 (Guest.dr[4])"), "{text}");
    assert!(text.contains("; crash marker 3 (scratch page)"), "{text}");
    assert!(text.contains("; crash marker 5 (Guest.dr[4])"), "{text}");

    // The same switcher without instrumentation has no such notes.
    let plain = listing_of(&legacy32_to_amd64(&TemplateOptions::default()));
    assert!(!plain.contains("; trace '"));
    assert!(!plain.contains("; crash marker"));
    let _ = Step::ALL;
}

#[test]
fn region_headers_count_instructions_and_32bit_code_has_8_digit_addresses() {
    let def = legacy32_to_amd64(&TemplateOptions::default());
    let c = ctx();
    let mut code = def.code.clone();
    let rel = relocate(&def, &mut code, &c).unwrap();
    let text = disasm::listing(&def, &code, &c, &rel).unwrap();
    let lines = disasm::lines(&def, &code, &c, &rel).unwrap();
    for r in &def.regions {
        let n = lines
            .iter()
            .filter(|l| l.insn.is_some() && r.range.contains(&l.off))
            .count();
        assert!(n > 0, "{}", r.name);
        let header = format!(
            "; ---- {} ({:?} view, {}-bit) {:#06x}..{:#06x}, {n} instructions",
            r.name, r.view, r.bits, r.range.start, r.range.end
        );
        assert!(text.contains(&header), "missing {header}");
    }
    for l in text.lines().filter(|l| l.starts_with("  0x")) {
        let addr = l.split_whitespace().nth(1).unwrap();
        let off = u32::from_str_radix(
            l.split_whitespace()
                .next()
                .unwrap()
                .trim_start_matches("0x"),
            16,
        )
        .unwrap();
        let bits = def.region_of(off).unwrap().bits;
        assert_eq!(addr.len(), if bits == 64 { 16 } else { 8 }, "{l}");
    }
}

/// Every template family, instrumented and not, built once.
fn defs() -> &'static [SwitcherDef] {
    static DEFS: OnceLock<Vec<SwitcherDef>> = OnceLock::new();
    DEFS.get_or_init(|| {
        let plain = TemplateOptions::default();
        let all = TemplateOptions {
            trace: true,
            crash_markers: true,
            x2apic: true,
            ..plain
        };
        let mut v = Vec::new();
        for o in [plain, all] {
            v.push(legacy32_to_amd64(&o));
            v.push(legacy_amd64::build(legacy_amd64::HostPaging::Pae, &o, &VM).unwrap());
            v.push(
                legacy_pae::build(
                    legacy_pae::Flavour::Legacy32,
                    legacy_pae::Flavour::Pae,
                    &o,
                    &VM,
                )
                .unwrap(),
            );
            v.push(amd64_legacy::build(legacy_pae::Flavour::Legacy32, &o, &VM).unwrap());
            v.push(amd64_amd64::build(&o, &VM).unwrap());
        }
        v.push(stub::build(32, &plain).unwrap());
        v.push(stub::build(64, &plain).unwrap());
        v
    })
}

fn addr64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..0x1_0000_0000,
        (0u64..0x2_0000).prop_map(|d| u64::MAX - d),
        (0u64..0x2_0000).prop_map(|d| (i64::MAX as u64).wrapping_sub(d)),
        (0u64..0x2_0000).prop_map(|d| 0x1_0000_0000 - d),
    ]
}

fn u32_edge() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        0u32..0x1_0000,
        (0u32..0x2_0000).prop_map(|d| u32::MAX - d),
    ]
}

fn contexts() -> impl Strategy<Value = RelocContext> {
    (
        (addr64(), addr64(), u32_edge(), addr64(), u32_edge()),
        (u32_edge(), u32_edge(), u32_edge(), u32_edge()),
        (addr64(), addr64(), addr64()),
        (
            any::<[u16; 4]>(),
            u32_edge(),
            any::<[bool; 4]>(),
            any::<Option<u32>>(),
        ),
    )
        .prop_map(
            |(
                (code_hc, code_id, code_rc, vm_hc, vm_rc),
                (vm_size, cpum_off, cpum_size, cpumcpu0_off),
                (cr3a, cr3b, cr3c),
                (sel, gdt_rc, cpu, apic),
            )| RelocContext {
                code_hc: HcAddr(code_hc),
                code_id: PhysAddr(code_id),
                code_rc: RcAddr(code_rc),
                vm_hc: HcAddr(vm_hc),
                vm_rc: RcAddr(vm_rc),
                vm_size,
                cpum_off,
                cpum_size,
                cpumcpu0_off,
                inter_cr3: InterCr3 {
                    legacy32: PhysAddr(cr3a),
                    pae: PhysAddr(cr3b),
                    amd64: PhysAddr(cr3c),
                    la57: None,
                },
                sel: HyperSelectors {
                    cs: sel[0],
                    ds: sel[1],
                    tss: sel[2],
                    cs64: sel[3],
                },
                gdt_rc: RcAddr(gdt_rc),
                cpu: CpuFacts {
                    nx: cpu[0],
                    fxsr: cpu[1],
                    host_sysenter: cpu[2],
                    host_syscall: cpu[3],
                },
                apic_rc: apic.map(RcAddr),
            },
        )
}

/// A change to one fixup record: `(which, kind, offset, operand)`, offsets
/// and operands either anywhere or inside the code.
type Mutation = (prop::sample::Index, u8, (bool, u32), Option<(bool, u32)>);

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(
        (
            any::<prop::sample::Index>(),
            any::<u8>(),
            (any::<bool>(), any::<u32>()),
            any::<Option<(bool, u32)>>(),
        ),
        0..6,
    )
}

fn mutate(def: &SwitcherDef, muts: &[Mutation]) -> SwitcherDef {
    let mut d = def.clone();
    let len = d.code_len().max(1);
    let pick = |(inside, v): (bool, u32)| if inside { v % len } else { v };
    for (which, kind, off, operand) in muts {
        let rec = FixupRecord {
            kind: FixupKind::from_u8(*kind)
                .unwrap_or(FixupKind::ALL[usize::from(*kind) % FixupKind::ALL.len()]),
            off: pick(*off),
            operand: operand.map(pick),
        };
        if d.fixups.is_empty() || which.index(4) == 0 {
            d.fixups.push(rec);
        } else {
            let i = which.index(d.fixups.len());
            d.fixups[i] = rec;
        }
    }
    d
}

/// Bytes that differ from the template all lie in fields the result says it wrote.
fn writes_in_bounds(
    def: &SwitcherDef,
    code: &[u8],
    applied: &[vmm_switcher::reloc::Applied],
) -> bool {
    code.len() == def.code.len()
        && code.iter().zip(&def.code).enumerate().all(|(i, (a, b))| {
            a == b
                || applied.iter().any(|f| {
                    let start = f.record.off as usize;
                    (start..start + f.len as usize).contains(&i)
                })
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The fixup stream decoder never panics, on any bytes and any code length.
    #[test]
    fn fixup_decoder_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        code_len in prop_oneof![0usize..0x2000, any::<usize>()],
    ) {
        if let Ok(recs) = fixup::decode(&bytes, code_len) {
            prop_assert!(recs.iter().all(|r| (r.off as usize) < code_len));
            // What decodes re-encodes to the same stream.
            prop_assert_eq!(fixup::encode(&recs).ok(), Some(bytes));
        }
    }

    /// Valid streams with one byte changed never panic the decoder either.
    #[test]
    fn corrupted_template_streams_never_panic(which in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let d = which.get(defs());
        let mut s = d.fixup_stream().unwrap();
        let i = at.index(s.len());
        s[i] = byte;
        let _ = fixup::decode(&s, d.code.len());
        let _ = fixup::decode(&s[..i], d.code.len());
    }

    /// Relocating mutated definitions at random contexts never panics; a
    /// success writes only inside the fields it reports, and its listing
    /// either renders or is a typed error.
    #[test]
    fn mutated_definitions_relocate_or_error(
        which in any::<prop::sample::Index>(),
        muts in mutations(),
        c in contexts(),
        bits in prop_oneof![8 => Just(None), 1 => prop::sample::select(vec![0u32, 8, 16, 32, 64, 65]).prop_map(Some)],
        region in any::<prop::sample::Index>(),
    ) {
        let mut d = mutate(which.get(defs()), &muts);
        if let Some(b) = bits {
            let i = region.index(d.regions.len());
            d.regions[i].bits = b;
        }
        let mut code = d.code.clone();
        if let Ok(rel) = relocate(&d, &mut code, &c) {
            prop_assert!(writes_in_bounds(&d, &code, &rel.applied));
            let _ = disasm::listing(&d, &code, &c, &rel);
        }
    }

    /// Unmodified definitions at random contexts: success or a typed error,
    /// and the same answer twice.
    #[test]
    fn random_contexts_relocate_or_error(which in any::<prop::sample::Index>(), c in contexts()) {
        let d = which.get(defs());
        let mut a = d.code.clone();
        let ra = relocate(d, &mut a, &c);
        let mut b = a.clone();
        let rb = relocate(d, &mut b, &c);
        prop_assert_eq!(&ra, &rb);
        if let Ok(rel) = ra {
            prop_assert_eq!(&a, &b);
            prop_assert!(writes_in_bounds(d, &a, &rel.applied));
            let lines = disasm::lines(d, &a, &c, &rel);
            if let Ok(lines) = lines {
                prop_assert!(!lines.is_empty());
            }
        }
    }
}
