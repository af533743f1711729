//! What an out-of-tree embedder relies on: its own pages (scattered table
//! pages included), one API for both host widths, refused selections and
//! HMA moves, the placement builder.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use vmm::mode::{GuestMode, HostPagingMode, SelectError};
use vmm::{
    CpumCpu32, CpumCpu64, CpumCpuShared, Flavour, HcAddr, HmaPages, PageError, PageProvider, Pages,
    PhysAddr, Placement, PlacementError, Purpose, RcAddr, SwitcherKind, TableOrder, VcpuCpum,
    VecPages, Vmm, VmmConfig, VmmError,
};

const PAE_HOST: (u64, u64, u64) = (0x8001_0033, 0x6b0, 0x801);
const AMD64_HOST: (u64, u64, u64) = (0x8001_0033, 0x6b0, 0xd01);

fn host((cr0, cr4, efer): (u64, u64, u64)) -> HostPagingMode {
    HostPagingMode::from_registers(cr0, cr4, efer, true, true).unwrap()
}

#[test]
fn select_refuses_a_host_the_core_was_not_built_for() {
    let x86 = Vmm::new(VmmConfig::default()).unwrap();
    let amd64 = host(AMD64_HOST);
    assert_eq!(
        x86.select(amd64, GuestMode::Amd64),
        Err(SelectError::HostWidth {
            host: amd64,
            core_bits: 32
        })
    );
    assert!(matches!(
        x86.select_stub(amd64),
        Err(SelectError::HostWidth { .. })
    ));
    assert_eq!(
        x86.select(host(PAE_HOST), GuestMode::Amd64),
        Ok(SwitcherKind::PaeToAmd64)
    );
    let wide = Vmm::new(VmmConfig::amd64_host()).unwrap();
    let pae = host(PAE_HOST);
    let e = wide.select(pae, GuestMode::Pae).unwrap_err();
    assert_eq!(
        e,
        SelectError::HostWidth {
            host: pae,
            core_bits: 64
        }
    );
    assert!(e.to_string().contains("32-bit hosts"), "{e}");
    assert_eq!(
        wide.select(amd64, GuestMode::Amd64),
        Ok(SwitcherKind::Amd64ToAmd64)
    );
    // Every answer names a switcher the core holds.
    let k = wide.select(amd64, GuestMode::Pae).unwrap();
    assert!(wide.switcher(k).is_ok());
}

#[test]
fn hma_moves_to_zero_or_overlapping_windows_are_refused() {
    let mut vmm = Vmm::new(VmmConfig::default()).unwrap();
    let before = vmm.hma().to_vec();
    let e = vmm.relocate_hma(RcAddr(0)).unwrap_err();
    assert!(
        matches!(e, VmmError::Placement(PlacementError::ZeroHmaRc)),
        "{e:?}"
    );
    let old = vmm.config().placement.hma_rc.0;
    let window = (vmm.hma().len() + vmm.core_code().len()) as u32;
    for new in [
        old + 0x1000,
        old - 0x1000,
        old + window - 0x1000,
        old - window + 0x1000,
    ] {
        let e = vmm.relocate_hma(RcAddr(new)).unwrap_err();
        assert!(
            matches!(&e, VmmError::Placement(PlacementError::HmaMoveOverlaps { new: r, .. })
                if r.start == u64::from(new)),
            "{e:?}"
        );
    }
    assert_eq!(vmm.hma(), &before[..]);
    // In place and far away are fine.
    vmm.relocate_hma(RcAddr(old)).unwrap();
    vmm.relocate_hma(RcAddr(old + window)).unwrap();
    vmm.relocate_hma(RcAddr(0xb000_0000)).unwrap();
    // A zero RC base is refused at construction as well.
    let mut c = VmmConfig::default();
    c.placement.hma_rc = RcAddr(0);
    assert!(matches!(
        Vmm::new(c),
        Err(VmmError::Placement(PlacementError::ZeroHmaRc))
    ));
}

#[test]
fn cpumcpu_is_the_variant_of_the_host_width() {
    let mut x86 = Vmm::new(VmmConfig::default()).unwrap();
    assert!(matches!(x86.cpumcpu(0).unwrap(), VcpuCpum::Host32(_)));
    let e = x86.cpumcpu_as::<CpumCpu64>(0).unwrap_err();
    assert!(
        matches!(
            e,
            VmmError::HostWidth {
                requested: 64,
                core: 32
            }
        ),
        "{e:?}"
    );
    let mut wide = Vmm::new(VmmConfig::amd64_host()).unwrap();
    let c = wide.cpumcpu(1).unwrap();
    assert_eq!(c.host_bits(), 64);
    assert!(c.as64().is_some() && c.as32().is_none());
    assert!(wide
        .with_cpumcpu_as::<CpumCpu32, _>(0, |c| c.host.esp = 1)
        .is_err());
    wide.with_cpumcpu_as::<CpumCpu64, _>(0, |c| c.host.rbx = 0x1122_3344_5566_7788)
        .unwrap();
    let at = vmm::layout::OFF_CPUM + wide.vcpu_arg(0).unwrap() as usize + cpum::layout::HOST64_RBX;
    assert_eq!(
        &wide.hma()[at..at + 8],
        &0x1122_3344_5566_7788u64.to_le_bytes()
    );
    // The shared editor leaves the host context alone on either width.
    for vmm in [&mut x86, &mut wide] {
        let host_before = vmm.cpumcpu_as::<CpumCpuShared>(0).unwrap().host;
        vmm.with_cpumcpu(0, |c| c.apic_base = 0xfee0_0000).unwrap();
        let after = vmm.cpumcpu(0).unwrap();
        assert_eq!(after.shared().apic_base, 0xfee0_0000);
        assert_eq!(after.shared().host, host_before);
    }
}

#[test]
fn placement_builder_derives_the_default_layouts() {
    let p = Placement::builder(HcAddr(0xc040_0000), RcAddr(0xa000_0000))
        .phys_base(PhysAddr(0x40_0000))
        .build()
        .unwrap();
    assert_eq!(p, Placement::default());
    let p = Placement::builder(HcAddr(0xffff_ffff_c040_0000), RcAddr(0xa000_0000))
        .build()
        .unwrap();
    assert_eq!(p, VmmConfig::amd64_host().placement);
    let p = Placement::builder(HcAddr(0xd000_0000), RcAddr(0x9000_0000))
        .phys_base(PhysAddr(0x100_0000))
        .slot(0x20_0000)
        .build()
        .unwrap();
    assert_eq!(p.hma_phys, PhysAddr(0x120_0000));
    assert_eq!(p.tables_phys, PhysAddr(0x140_0000));
    assert_eq!(p.hma_hc, HcAddr(0xd020_0000));
    let bad = Placement::builder(HcAddr(0xc040_0000), RcAddr(0)).build();
    assert_eq!(bad, Err(PlacementError::ZeroHmaRc));
    let bad = Placement::builder(HcAddr(0xc040_0123), RcAddr(0xa000_0000)).build();
    assert!(matches!(
        bad,
        Err(PlacementError::Misaligned {
            what: "HC base",
            ..
        })
    ));
    let bad = Placement::builder(HcAddr(u64::MAX - 0xfff), RcAddr(0xa000_0000)).build();
    assert!(matches!(
        bad,
        Err(PlacementError::Wraps { what: "HMA HC", .. })
    ));
}

/// A provider over pages the test chooses: the core code and HMA at fixed
/// addresses (or the HMA page by page from a list), table pages from a
/// list, a log of every request.
#[derive(Debug, Default)]
struct Chosen {
    code: u64,
    hma: u64,
    hma_pages: Option<Vec<u64>>,
    tables: Vec<u64>,
    mapping_len: Option<usize>,
    log: Vec<(Purpose, usize)>,
}

impl PageProvider for Chosen {
    type Mapping = Box<[u8]>;

    fn contiguous(
        &mut self,
        purpose: Purpose,
        pages: usize,
    ) -> Result<Pages<Box<[u8]>>, PageError> {
        self.log.push((purpose, pages));
        let phys = if purpose == Purpose::CoreCode {
            self.code
        } else {
            self.hma
        };
        let len = self.mapping_len.unwrap_or(pages * 4096);
        Ok(Pages {
            phys: PhysAddr(phys),
            map: vec![0; len].into_boxed_slice(),
        })
    }

    fn hma(&mut self, pages: usize) -> Result<HmaPages<Box<[u8]>>, PageError> {
        let Some(list) = &self.hma_pages else {
            let run = self.contiguous(Purpose::Hma, pages)?;
            let phys = (0..pages as u64)
                .map(|i| PhysAddr(run.phys.0 + i * 4096))
                .collect();
            return Ok(HmaPages { phys, map: run.map });
        };
        self.log.push((Purpose::Hma, pages));
        Ok(HmaPages {
            phys: list.iter().copied().take(pages).map(PhysAddr).collect(),
            map: vec![0; pages * 4096].into_boxed_slice(),
        })
    }

    fn table_page(&mut self, purpose: Purpose) -> Result<Pages<Box<[u8]>>, PageError> {
        self.log.push((purpose, 1));
        let phys = self
            .tables
            .pop()
            .ok_or(PageError::Exhausted { purpose, pages: 1 })?;
        Ok(Pages {
            phys: PhysAddr(phys),
            map: vec![0; 4096].into_boxed_slice(),
        })
    }
}

fn chosen(tables: Vec<u64>) -> Chosen {
    Chosen {
        code: 0x0180_0000,
        hma: 0x0200_0000,
        tables,
        ..Chosen::default()
    }
}

/// 64 table pages scattered over 64 MiB, none adjacent to another.
fn scattered_pages() -> Vec<u64> {
    (0..64u64)
        .map(|i| 0x0400_0000 + ((i * 37) % 64) * 0x10_0000 + i * 0x3000)
        .collect()
}

#[test]
fn an_embedders_scattered_pages_hold_working_tables() {
    let pages = scattered_pages();
    let cfg = VmmConfig::default();
    let vmm = Vmm::with_pages(cfg.clone(), chosen(pages.clone())).unwrap();
    // Contiguous only where the architecture needs it.
    let log = &vmm.pages().log;
    assert_eq!(log[0].0, Purpose::CoreCode);
    assert_eq!(log[1].0, Purpose::Hma);
    assert!(log[2..].iter().all(|(p, n)| *n == 1 && !p.contiguous()));
    assert!(Purpose::CoreCode.contiguous() && Purpose::CoreCode.below_4g());
    assert!(!Purpose::Hma.contiguous() && Purpose::Hma.below_4g());
    // The placement reports the pages actually used.
    let p = vmm.config().placement;
    assert_eq!(p.code_phys, PhysAddr(0x0180_0000));
    assert_eq!(p.hma_phys, PhysAddr(0x0200_0000));
    let given: BTreeSet<u64> = pages.iter().copied().collect();
    for which in [Purpose::Tables, Purpose::HyperTables] {
        let used = vmm.table_pages(which);
        assert!(used.len() > 2);
        for (phys, bytes) in &used {
            assert!(given.contains(&phys.0));
            assert_eq!(bytes.len(), 4096);
        }
    }
    // Every view of the core code and the HMA translates through the tables
    // in every flavour, although no table page is next to another.
    for flavour in Flavour::ALL {
        let t = |va: u64| vmm.intermediate().translate(flavour, va).unwrap().phys;
        assert_eq!(t(p.code_hc.0 + 0x123), p.code_phys.0 + 0x123);
        assert_eq!(t(p.code_phys.0 + 0x456), p.code_phys.0 + 0x456);
        assert_eq!(t(u64::from(p.hma_rc.0) + 0x789), p.hma_phys.0 + 0x789);
    }
    // Same code as the default provider but for the intermediate CR3s.
    let default = Vmm::new(cfg).unwrap();
    assert_eq!(default.core_code().len(), vmm.core_code().len());
    assert_ne!(default.core_code(), vmm.core_code());
    assert!(vmm.intermediate().cr3_pae() as u64 >= 0x0400_0000);
}

/// HMA pages two apart, from the top down: no page next to the one before.
fn scattered_hma(pages: usize) -> Vec<u64> {
    (0..pages as u64)
        .map(|i| 0x0300_0000 - i * 0x2000)
        .collect()
}

#[test]
fn an_embedders_scattered_hma_pages_are_mapped_page_by_page() {
    let cfg = VmmConfig::default();
    let mut c = chosen(scattered_pages());
    c.hma_pages = Some(scattered_hma(256));
    let vmm = Vmm::with_pages(cfg, c).unwrap();
    let p = vmm.config().placement;
    let hma = vmm.hma_pages().to_vec();
    let pages = vmm.hma().len().div_ceil(4096);
    assert!(pages > 2, "{pages}");
    assert_eq!(hma.len(), pages);
    assert_eq!(
        hma,
        scattered_hma(pages)
            .into_iter()
            .map(PhysAddr)
            .collect::<Vec<_>>()
    );
    assert_eq!(p.hma_phys, hma[0]);
    // RC page i lands on physical page i in both contexts, every flavour.
    for (i, page) in (0u64..).zip(&hma) {
        let rc = u64::from(p.hma_rc.0) + i * 4096 + 0x18;
        for flavour in Flavour::ALL {
            for ctx in [vmm.intermediate(), vmm.hyper_context()] {
                assert_eq!(ctx.translate(flavour, rc).unwrap().phys, page.0 + 0x18);
            }
        }
    }
    // The VM structure's physical address is on its own page.
    let (_, _, vm_phys) = vmm.vm_addrs();
    let off = u64::from(vmm.hma_layout().vm);
    assert_eq!(vm_phys.0, hma[(off / 4096) as usize].0 + off % 4096);
}

#[test]
fn bad_hma_pages_from_a_provider_are_typed_errors() {
    let err = |hma: Vec<u64>| {
        let mut c = chosen(scattered_pages());
        c.hma_pages = Some(hma);
        match Vmm::with_pages(VmmConfig::default(), c) {
            Err(e) => e,
            Ok(_) => panic!("bad HMA pages accepted"),
        }
    };
    // One page above 4 GiB: the 32-bit tables cannot point at it.
    let mut hma = scattered_hma(256);
    hma[1] = 0x1_0000_0000;
    let e = err(hma);
    assert!(
        matches!(
            e,
            VmmError::Placement(PlacementError::Above4G {
                what: "HMA physical",
                start: 0x1_0000_0000,
                ..
            })
        ),
        "{e:?}"
    );
    // Two HMA pages at one address, one on the core code, one misaligned.
    let mut hma = scattered_hma(256);
    hma[2] = hma[0];
    let e = err(hma);
    assert!(
        matches!(e, VmmError::Placement(PlacementError::Overlap { .. })),
        "{e:?}"
    );
    let mut hma = scattered_hma(256);
    hma[1] = 0x0180_0000;
    let e = err(hma);
    assert!(
        matches!(e, VmmError::Placement(PlacementError::Overlap { .. })),
        "{e:?}"
    );
    let mut hma = scattered_hma(256);
    hma[1] = 0x0300_0800;
    let e = err(hma);
    assert!(
        matches!(
            e,
            VmmError::Placement(PlacementError::Misaligned {
                addr: 0x0300_0800,
                ..
            })
        ),
        "{e:?}"
    );
    // Too few pages.
    let e = err(scattered_hma(1));
    assert!(
        matches!(
            e,
            VmmError::Placement(PlacementError::HmaPageCount { got: 1, .. })
        ),
        "{e:?}"
    );
}

#[test]
fn bad_pages_from_a_provider_are_typed_errors() {
    let err = |p: Chosen| match Vmm::with_pages(VmmConfig::default(), p) {
        Err(e) => e,
        Ok(_) => panic!("bad pages accepted"),
    };
    // A table page above 4 GiB.
    let mut pages = scattered_pages();
    pages[10] = 0x1_0000_0000;
    let e = err(chosen(pages));
    assert!(
        matches!(
            e,
            VmmError::Placement(PlacementError::Above4G {
                what: "intermediate tables",
                start: 0x1_0000_0000,
                ..
            })
        ),
        "{e:?}"
    );
    // A table page inside the core code.
    let mut pages = scattered_pages();
    pages[3] = 0x0180_1000;
    assert!(matches!(
        err(chosen(pages)),
        VmmError::Placement(PlacementError::Overlap { .. })
    ));
    // Two table pages at one address.
    let mut pages = scattered_pages();
    pages[5] = pages[6];
    assert!(matches!(
        err(chosen(pages)),
        VmmError::Placement(PlacementError::Overlap { .. })
    ));
    // A misaligned page, a mapping of the wrong size, too few pages.
    let mut pages = scattered_pages();
    pages[0] = 0x0500_0800;
    assert!(matches!(
        err(chosen(pages)),
        VmmError::Placement(PlacementError::Misaligned {
            addr: 0x0500_0800,
            ..
        })
    ));
    let mut c = chosen(scattered_pages());
    c.mapping_len = Some(4096);
    assert!(matches!(
        err(c),
        VmmError::Placement(PlacementError::MappingSize { got: 4096, .. })
    ));
    let e = err(chosen(scattered_pages()[..20].to_vec()));
    assert!(
        matches!(e, VmmError::Pages(PageError::Exhausted { .. })),
        "{e:?}"
    );
    // The core code above 4 GiB.
    let mut c = chosen(scattered_pages());
    c.code = 0x1_0000_0000;
    assert!(matches!(
        err(c),
        VmmError::Placement(PlacementError::Above4G {
            what: "core-code physical",
            ..
        })
    ));
}

#[test]
fn the_default_provider_can_scatter_its_table_pages() {
    let cfg = VmmConfig::default();
    let pages = VecPages::with_order(&cfg.placement, cfg.table_pages, TableOrder::Scattered);
    let vmm = Vmm::with_pages(cfg.clone(), pages).unwrap();
    let used: Vec<u64> = vmm
        .table_pages(Purpose::Tables)
        .iter()
        .map(|(p, _)| p.0)
        .collect();
    for w in used.windows(2) {
        assert!(w[0].abs_diff(w[1]) > 0x1000, "{used:x?}");
    }
    let (base, image) = vmm.tables();
    assert!(base.0 >= cfg.placement.tables_phys.0);
    assert_eq!(image.len() % 4096, 0);
    let p = vmm.config().placement;
    for flavour in Flavour::ALL {
        let phys = vmm
            .intermediate()
            .translate(flavour, u64::from(p.hma_rc.0))
            .unwrap()
            .phys;
        assert_eq!(phys, p.hma_phys.0);
    }
}

#[test]
fn the_host_apic_version_reaches_every_vcpu_at_its_layout_offset() {
    for cfg in [VmmConfig::default(), VmmConfig::amd64_host()] {
        let mut vmm = Vmm::new(cfg).unwrap();
        vmm.set_host_apic_version(0x0005_0014).unwrap();
        for i in 0..vmm.config().vcpus {
            let at = vmm::layout::OFF_CPUM
                + vmm.vcpu_arg(i).unwrap() as usize
                + cpum::layout::APIC_VERSION;
            assert_eq!(
                &vmm.hma()[at..at + 4],
                &0x0005_0014u32.to_le_bytes(),
                "vcpu {i}"
            );
        }
    }
}
