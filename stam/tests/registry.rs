//! Registry behaviour: registration checks, selection and order, reset rules,
//! foreign and owned memory, and every output format.

use core::mem::offset_of;

use stam::{
    Backing, BackingMut, RegionId, Registry, SampleDef, SampleLocation, SampleValue, Snapshot,
    StamCounter, StamError, StamProfile, StamProfileAdv, StamRatioU32, StamType, StamUnit,
    StamVisibility, Value,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

type R = Result<(), StamError>;

/// One field of every kind, as a VM structure would hold them.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
struct Stats {
    counter: StamCounter,
    profile: StamProfile,
    adv: StamProfileAdv,
    ratio: StamRatioU32,
    ratio_reset: StamRatioU32,
    u64v: u64,
    u64r: u64,
    x64: u64,
    x64r: u64,
    u32v: u32,
    u32r: u32,
    x32: u32,
    x32r: u32,
    u16v: u16,
    u16r: u16,
    x16: u16,
    x16r: u16,
    u8v: u8,
    u8r: u8,
    x8: u8,
    x8r: u8,
    b: u8,
    br: u8,
    pad: [u8; 2],
}

const _: () = assert!(size_of::<Stats>() == 160);

fn def(name: &str, ty: StamType) -> SampleDef<'_> {
    SampleDef::new(name, ty, StamUnit::Count)
}

/// Registers every field of [`Stats`] under `/T/...`.
fn full_registry() -> Result<(Registry, RegionId), StamError> {
    let mut reg = Registry::new();
    let rg = reg.add_region_for::<Stats>("stats");
    let fields: [(&str, StamType, usize); 23] = [
        ("/T/Counter", StamType::Counter, offset_of!(Stats, counter)),
        ("/T/Profile", StamType::Profile, offset_of!(Stats, profile)),
        ("/T/Adv", StamType::ProfileAdv, offset_of!(Stats, adv)),
        ("/T/Ratio", StamType::RatioU32, offset_of!(Stats, ratio)),
        (
            "/T/RatioR",
            StamType::RatioU32Reset,
            offset_of!(Stats, ratio_reset),
        ),
        ("/T/U64", StamType::U64, offset_of!(Stats, u64v)),
        ("/T/U64R", StamType::U64Reset, offset_of!(Stats, u64r)),
        ("/T/X64", StamType::X64, offset_of!(Stats, x64)),
        ("/T/X64R", StamType::X64Reset, offset_of!(Stats, x64r)),
        ("/T/U32", StamType::U32, offset_of!(Stats, u32v)),
        ("/T/U32R", StamType::U32Reset, offset_of!(Stats, u32r)),
        ("/T/X32", StamType::X32, offset_of!(Stats, x32)),
        ("/T/X32R", StamType::X32Reset, offset_of!(Stats, x32r)),
        ("/T/U16", StamType::U16, offset_of!(Stats, u16v)),
        ("/T/U16R", StamType::U16Reset, offset_of!(Stats, u16r)),
        ("/T/X16", StamType::X16, offset_of!(Stats, x16)),
        ("/T/X16R", StamType::X16Reset, offset_of!(Stats, x16r)),
        ("/T/U8", StamType::U8, offset_of!(Stats, u8v)),
        ("/T/U8R", StamType::U8Reset, offset_of!(Stats, u8r)),
        ("/T/X8", StamType::X8, offset_of!(Stats, x8)),
        ("/T/X8R", StamType::X8Reset, offset_of!(Stats, x8r)),
        ("/T/Bool", StamType::Bool, offset_of!(Stats, b)),
        ("/T/BoolR", StamType::BoolReset, offset_of!(Stats, br)),
    ];
    for (name, ty, off) in fields {
        reg.register(def(name, ty), rg, off)?;
    }
    Ok((reg, rg))
}

fn busy_stats() -> Stats {
    let mut s = Stats::default();
    s.counter.add(7);
    s.profile.add_period(10);
    s.profile.add_period(30);
    s.adv.start(100);
    s.adv.stop(150);
    s.adv.start(200);
    s.ratio.set(1, 2);
    s.ratio_reset.set(3, 4);
    s.u64v = 64;
    s.u64r = 65;
    s.x64 = 0xdead_beef_0000;
    s.x64r = 0x41;
    s.u32v = 32;
    s.u32r = 33;
    s.x32 = 0xabc;
    s.x32r = 0x21;
    s.u16v = 16;
    s.u16r = 17;
    s.x16 = 0xff;
    s.x16r = 0x11;
    s.u8v = 8;
    s.u8r = 9;
    s.x8 = 0xf;
    s.x8r = 0x9;
    s.b = 1;
    s.br = 1;
    s
}

// ---------------------------------------------------------------------------
// Registration.

#[test]
fn registration_errors_are_typed() -> R {
    let mut reg = Registry::new();
    let rg = reg.add_region("vm", 64);
    reg.register(def("/A", StamType::Counter), rg, 0)?;

    let e = |r: Result<_, StamError>| r.err();
    assert_eq!(
        e(reg.register(def("/A", StamType::Counter), rg, 8)),
        Some(StamError::Duplicate { name: "/A".into() })
    );
    assert_eq!(
        e(reg.register(def("A", StamType::Counter), rg, 8)),
        Some(StamError::NoLeadingSlash { name: "A".into() })
    );
    assert_eq!(
        e(reg.register(def("/B", StamType::Callback), rg, 8)),
        Some(StamError::UnsupportedType {
            name: "/B".into(),
            ty: StamType::Callback
        })
    );
    let mut other = Registry::new();
    let foreign = other.add_region("x", 8);
    let _ = other.add_region("y", 8);
    let unknown = other.add_region("z", 8);
    assert_eq!(foreign, rg);
    assert_eq!(
        e(reg.register(def("/B", StamType::Counter), unknown, 0)),
        Some(StamError::UnknownRegion {
            name: "/B".into(),
            region: unknown
        })
    );
    assert_eq!(
        e(reg.register(def("/B", StamType::Profile), rg, 40)),
        Some(StamError::OutOfBounds {
            name: "/B".into(),
            region: rg,
            offset: 40,
            size: 32,
            region_len: 64
        })
    );
    assert!(matches!(
        e(reg.register(def("/B", StamType::Counter), rg, usize::MAX - 3)),
        Some(StamError::OutOfBounds { .. })
    ));
    assert_eq!(
        e(reg.register(def("/B", StamType::Counter), rg, 12)),
        Some(StamError::Misaligned {
            name: "/B".into(),
            offset: 12,
            align: 8
        })
    );
    assert_eq!(
        e(reg.register(def("/B", StamType::U16), rg, 13)),
        Some(StamError::Misaligned {
            name: "/B".into(),
            offset: 13,
            align: 2
        })
    );
    // Exactly at the end is fine; one byte types need no alignment.
    reg.register(def("/C", StamType::Profile), rg, 32)?;
    reg.register(def("/D", StamType::U8), rg, 63)?;
    assert_eq!(reg.len(), 3);

    // register_as catches a field of the wrong Rust type.
    assert_eq!(
        e(reg.register_as::<StamCounter>(def("/E", StamType::Profile), rg, 8)),
        Some(StamError::TypeMismatch {
            name: "/E".into(),
            ty: StamType::Profile,
            requested: "StamCounter"
        })
    );
    assert_eq!(
        e(reg.register_as::<StamProfile>(def("/E", StamType::ProfileAdv), rg, 8)),
        Some(StamError::TypeMismatch {
            name: "/E".into(),
            ty: StamType::ProfileAdv,
            requested: "StamProfile"
        })
    );
    assert_eq!(
        e(reg.register_as::<StamCounter>(def("/E/", StamType::Profile), rg, 8)),
        Some(StamError::TrailingSlash { name: "/E/".into() })
    );
    reg.register_as::<u32>(def("/E", StamType::X32Reset), rg, 8)?;
    Ok(())
}

#[test]
fn error_messages_are_readable() {
    let e = StamError::Misaligned {
        name: "/X".into(),
        offset: 3,
        align: 8,
    };
    assert_eq!(
        e.to_string(),
        "sample \"/X\": offset 3 is not aligned to 8 bytes"
    );
}

// ---------------------------------------------------------------------------
// Enumeration and selection.

fn names(reg: &Registry, pat: &str) -> Vec<String> {
    reg.iter(pat).map(|i| i.name.to_string()).collect()
}

#[test]
fn enumeration_is_sorted_and_selective() -> R {
    let mut reg = Registry::new();
    for n in [
        "/b", "/a/y", "/ab", "/a-b", "/a", "/a/x/z", "/a/x", "/B", "/a/x2",
    ] {
        reg.register_owned(def(n, StamType::Counter))?;
    }
    let all = [
        "/B", "/a", "/a/x", "/a/x/z", "/a/x2", "/a/y", "/a-b", "/ab", "/b",
    ];
    assert_eq!(names(&reg, ""), all);
    assert_eq!(names(&reg, "*"), all);
    assert_eq!(names(&reg, "/a/x"), ["/a/x"]);
    assert_eq!(names(&reg, "/nope"), Vec::<String>::new());
    // Prefix: '*' crosses '/'.
    assert_eq!(
        names(&reg, "/a*"),
        ["/a", "/a/x", "/a/x/z", "/a/x2", "/a/y", "/a-b", "/ab"]
    );
    assert_eq!(names(&reg, "/a/*"), ["/a/x", "/a/x/z", "/a/x2", "/a/y"]);
    assert_eq!(names(&reg, "*z"), ["/a/x/z"]);
    assert_eq!(names(&reg, "/a/?"), ["/a/x", "/a/y"]);
    assert_eq!(names(&reg, "/a?b"), ["/a-b"]);
    // Alternatives come out merged, in name order, without duplicates.
    assert_eq!(
        names(&reg, "/b|/a/*|/a/x"),
        ["/a/x", "/a/x/z", "/a/x2", "/a/y", "/b"]
    );
    assert_eq!(names(&reg, "/B|/b"), ["/B", "/b"]);

    let id = reg
        .find("/a/x")
        .ok_or(StamError::NoLeadingSlash { name: "".into() })?;
    let info = reg.info(id).ok_or(StamError::UnknownSample { id })?;
    assert_eq!(info.name, "/a/x");
    assert_eq!(info.ty, StamType::Counter);
    assert!(matches!(info.location, SampleLocation::Owned { .. }));

    assert_eq!(reg.deregister("/a/x*"), 3);
    assert_eq!(names(&reg, "/a/*"), ["/a/y"]);
    assert_eq!(reg.find("/a/x"), None);
    assert_eq!(reg.info(id), None);
    assert_eq!(reg.deregister_id(id), Err(StamError::UnknownSample { id }));
    let b = reg
        .find("/b")
        .ok_or(StamError::NoLeadingSlash { name: "".into() })?;
    reg.deregister_id(b)?;
    assert_eq!(reg.len(), 5);
    // The name is free again.
    reg.register_owned(def("/b", StamType::U8))?;
    assert!(!reg.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------
// Reset.

#[test]
fn reset_rules_per_type() -> R {
    let (mut reg, rg) = full_registry()?;
    let mut s = busy_stats();
    let before = s;
    let n = reg.reset("", &mut BackingMut::new().with_struct(rg, &mut s))?;
    assert_eq!(n, 23);

    let mut want = before;
    want.counter = StamCounter::RESET;
    want.profile = StamProfile::RESET;
    want.adv = StamProfileAdv::RESET;
    want.ratio_reset = StamRatioU32::default();
    want.u64r = 0;
    want.x64r = 0;
    want.u32r = 0;
    want.x32r = 0;
    want.u16r = 0;
    want.x16r = 0;
    want.u8r = 0;
    want.x8r = 0;
    want.br = 0;
    assert_eq!(s, want);
    // Untouched: plain ratio and the plain scalars.
    assert_eq!(s.ratio, before.ratio);
    assert_eq!((s.u64v, s.x32, s.u16v, s.x8, s.b), (64, 0xabc, 16, 0xf, 1));
    assert_eq!(s.profile.ticks_min, u64::MAX);
    assert!(!s.adv.is_running());
    Ok(())
}

#[test]
fn reset_by_pattern_only_touches_selection() -> R {
    let (mut reg, rg) = full_registry()?;
    let mut s = busy_stats();
    let n = reg.reset(
        "/T/Counter|/T/U8?",
        &mut BackingMut::new().with_struct(rg, &mut s),
    )?;
    assert_eq!(n, 2);
    assert_eq!(s.counter.c, 0);
    assert_eq!(s.u8r, 0);
    assert_eq!(s.profile.periods, 2);
    assert_eq!(s.u64r, 65);
    Ok(())
}

#[test]
fn reset_checks_backing_before_writing() -> R {
    let mut reg = Registry::new();
    let a = reg.add_region("a", 8);
    let b = reg.add_region("b", 8);
    reg.register(def("/a", StamType::Counter), a, 0)?;
    reg.register(def("/b", StamType::Counter), b, 0)?;
    let mut mem_a = StamCounter { c: 5 };
    let err = reg.reset("*", &mut BackingMut::new().with_struct(a, &mut mem_a));
    assert_eq!(
        err,
        Err(StamError::RegionNotSupplied {
            region: b,
            region_name: "b".into()
        })
    );
    assert_eq!(mem_a.c, 5, "nothing written on error");
    let mut short = [0u8; 4];
    let err = reg.reset(
        "*",
        &mut BackingMut::new()
            .with_struct(a, &mut mem_a)
            .with(b, &mut short),
    );
    assert_eq!(
        err,
        Err(StamError::RegionTooSmall {
            region: b,
            region_name: "b".into(),
            need: 8,
            got: 4
        })
    );
    assert_eq!(mem_a.c, 5);
    // Selecting only the supplied region works.
    reg.reset("/a", &mut BackingMut::new().with_struct(a, &mut mem_a))?;
    assert_eq!(mem_a.c, 0);
    Ok(())
}

// ---------------------------------------------------------------------------
// Foreign and owned memory.

#[test]
fn foreign_memory_from_a_dump() -> R {
    // A "memory dump": the structure image at an odd offset inside a larger
    // buffer (unaligned on purpose), as decoded from QEMU.
    let mut reg = Registry::new();
    let rg = reg.add_region_for::<Stats>("vm");
    let id = reg.register_as::<StamProfileAdv>(
        def("/VMM/Switcher/ToGC", StamType::ProfileAdv),
        rg,
        offset_of!(Stats, adv),
    )?;
    let stats = busy_stats();
    let mut dump = vec![0xccu8; 1 + size_of::<Stats>() + 16];
    dump[1..=160].copy_from_slice(stats.as_bytes());
    let backing = Backing::new().with(rg, &dump[1..]);
    let adv: StamProfileAdv = reg.read(id, &backing)?;
    assert_eq!(adv, stats.adv);
    let core: StamProfile = reg.read(id, &backing)?;
    assert_eq!(core, stats.adv.core);
    assert_eq!(
        reg.value(id, &backing)?,
        Value::Profile {
            periods: 1,
            ticks: 50,
            ticks_max: Some(50),
            ticks_min: Some(50)
        }
    );
    assert!(matches!(
        reg.read::<StamCounter>(id, &backing),
        Err(StamError::TypeMismatch { .. })
    ));
    // Missing or short memory is an error, not a panic.
    assert!(matches!(
        reg.value(id, &Backing::new()),
        Err(StamError::RegionNotSupplied { .. })
    ));
    assert!(matches!(
        reg.print("*", &Backing::new().with(rg, &dump[..100])),
        Err(StamError::RegionTooSmall {
            need: 160,
            got: 100,
            ..
        })
    ));

    // Writing through a mutable backing, unaligned too.
    let mut bm = BackingMut::new().with(rg, &mut dump[1..]);
    reg.write(id, &mut bm, &StamProfileAdv::RESET)?;
    let back: StamProfileAdv = reg.read(id, &bm.as_backing())?;
    assert_eq!(back, StamProfileAdv::RESET);
    Ok(())
}

#[test]
fn owned_samples() -> R {
    let mut reg = Registry::new();
    let c = reg.register_owned(def("/O/Counter", StamType::Counter))?;
    let p = reg.register_owned(def("/O/Adv", StamType::ProfileAdv))?;
    let f = reg.register_owned(def("/O/Flag", StamType::BoolReset))?;
    let x = reg.register_owned(def("/O/X16", StamType::X16))?;
    assert_eq!(reg.owned::<StamProfileAdv>(p)?, &StamProfileAdv::RESET);
    reg.owned_mut::<StamCounter>(c)?.add(3);
    {
        let adv = reg.owned_mut::<StamProfileAdv>(p)?;
        adv.start(10);
        adv.stop(25);
    }
    *reg.owned_mut::<u8>(f)? = 1;
    *reg.owned_mut::<u16>(x)? = 0x1234;
    let none = Backing::new();
    assert_eq!(reg.value(c, &none)?, Value::Counter { c: 3 });
    assert_eq!(reg.value(f, &none)?, Value::Bool(true));
    assert_eq!(reg.value(x, &none)?, Value::Unsigned(0x1234));
    assert_eq!(reg.owned::<StamProfile>(p)?.ticks, 15);
    assert!(matches!(
        reg.owned_mut::<StamProfileAdv>(c),
        Err(StamError::TypeMismatch { .. })
    ));
    reg.write(x, &mut BackingMut::new(), &0x55aau16)?;
    assert_eq!(reg.read::<u16>(x, &none)?, 0x55aa);

    reg.reset("*", &mut BackingMut::new())?;
    assert_eq!(reg.owned::<StamCounter>(c)?.c, 0);
    assert_eq!(reg.owned::<StamProfileAdv>(p)?, &StamProfileAdv::RESET);
    assert_eq!(*reg.owned::<u8>(f)?, 0);
    assert_eq!(*reg.owned::<u16>(x)?, 0x55aa, "X16 is not a reset type");

    // A region sample is not owned.
    let rg = reg.add_region("r", 8);
    let r = reg.register(def("/R", StamType::Counter), rg, 0)?;
    assert_eq!(
        reg.owned::<StamCounter>(r).err(),
        Some(StamError::NotOwned { name: "/R".into() })
    );
    reg.deregister_id(c)?;
    assert_eq!(
        reg.owned::<StamCounter>(c).err(),
        Some(StamError::UnknownSample { id: c })
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Output formats.

const PRINT_ALL: &str = "\
/T/Adv                                 50 count (          50 count,       1 times, max        50, min      50)
/T/Bool                          true     count
/T/BoolR                         true     count
/T/Counter                              7 count
/T/Profile                             20 count (          40 count,       2 times, max        30, min      10)
/T/Ratio                                1:2        count
/T/RatioR                               3:4        count
/T/U16                                 16 count
/T/U16R                                17 count
/T/U32                                 32 count
/T/U32R                                33 count
/T/U64                                 64 count
/T/U64R                                65 count
/T/U8                                   8 count
/T/U8R                                  9 count
/T/X16                                 ff count
/T/X16R                                11 count
/T/X32                                abc count
/T/X32R                                21 count
/T/X64                           deadbeef0000 count
/T/X64R                                41 count
/T/X8                                   f count
/T/X8R                                  9 count
";

#[test]
fn print_layout_every_type() -> R {
    let (reg, rg) = full_registry()?;
    let s = busy_stats();
    assert_eq!(
        reg.print("", &Backing::new().with_struct(rg, &s))?,
        PRINT_ALL
    );
    Ok(())
}

#[test]
fn print_profile_units_and_empty_profile() -> R {
    let mut reg = Registry::new();
    let a = reg.register_owned(SampleDef::new(
        "/PROF/VM/SwitchToGC",
        StamType::ProfileAdv,
        StamUnit::TicksPerCall,
    ))?;
    reg.register_owned(SampleDef::new(
        "/PROF/Empty",
        StamType::Profile,
        StamUnit::NsPerOccurence,
    ))?;
    reg.register_owned(SampleDef::new(
        "/GoodBad",
        StamType::RatioU32,
        StamUnit::GoodBad,
    ))?;
    reg.register_owned(SampleDef::new("/NoUnit", StamType::Counter, StamUnit::None))?;
    reg.owned_mut::<StamProfile>(a)?.add_period(123_456_789);
    let text = reg.print("*", &Backing::new())?;
    assert_eq!(
        text,
        "/GoodBad                                0:0        good:bad\n\
         /NoUnit                                 0 \n\
         /PROF/Empty                             0 ns/time (           0 ns,       0 times, max         -, min       -)\n\
         /PROF/VM/SwitchToGC              123456789 ticks/call (   123456789 ticks,       1 calls, max 123456789, min 123456789)\n"
    );
    Ok(())
}

#[test]
fn used_visibility_hides_zero_samples() -> R {
    let mut reg = Registry::new();
    let used = StamVisibility::Used;
    let c0 = reg.register_owned(def("/c0", StamType::Counter).visibility(used))?;
    let c1 = reg.register_owned(def("/c1", StamType::Counter).visibility(used))?;
    reg.register_owned(def("/p0", StamType::Profile).visibility(used))?;
    reg.register_owned(def("/r0", StamType::RatioU32).visibility(used))?;
    reg.register_owned(def("/u0", StamType::U32).visibility(used))?;
    reg.register_owned(def("/b0", StamType::Bool).visibility(used))?;
    reg.register_owned(def("/ng", StamType::Counter).visibility(StamVisibility::NotGui))?;
    reg.owned_mut::<StamCounter>(c1)?.inc();
    let none = Backing::new();
    assert_eq!(
        reg.print("", &none)?,
        "/c1                                     1 count\n\
         /ng                                     0 count\n"
    );
    assert_eq!(
        reg.xml("", false, &none)?,
        "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n\
         <Statistics>\n\
         <Counter c=\"1\" unit=\"count\" vis=\"used\" name=\"/c1\"/>\n\
         <Counter c=\"0\" unit=\"count\" vis=\"not-gui\" name=\"/ng\"/>\n\
         </Statistics>\n"
    );
    // Enumeration and snapshots list everything.
    assert_eq!(reg.iter("").count(), 7);
    assert_eq!(reg.snapshot("", &none)?.samples.len(), 7);
    assert_eq!(reg.value(c0, &none)?, Value::Counter { c: 0 });
    Ok(())
}

#[test]
fn xml_every_type_with_descriptions() -> R {
    let (mut reg, rg) = full_registry()?;
    // No character classes: '[' is a literal and matches nothing here.
    assert_eq!(reg.deregister("/T/[UX]*"), 0);
    let s = busy_stats();
    let x = reg.xml(
        "/T/[*|/T/C*|/T/P*|/T/R*|/T/X64|/T/U8|/T/Bool",
        true,
        &Backing::new().with_struct(rg, &s),
    )?;
    assert_eq!(
        x,
        "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n\
         <Statistics>\n\
         <BOOL val=\"true\" unit=\"count\" name=\"/T/Bool\"/>\n\
         <Counter c=\"7\" unit=\"count\" name=\"/T/Counter\"/>\n\
         <Profile cPeriods=\"2\" cTicks=\"40\" cTicksMin=\"10\" cTicksMax=\"30\" unit=\"count\" name=\"/T/Profile\"/>\n\
         <Ratio32 u32A=\"1\" u32B=\"2\" unit=\"count\" name=\"/T/Ratio\"/>\n\
         <Ratio32 u32A=\"3\" u32B=\"4\" unit=\"count\" name=\"/T/RatioR\"/>\n\
         <U8 val=\"8\" unit=\"count\" name=\"/T/U8\"/>\n\
         <X64 val=\"0xdeadbeef0000\" unit=\"count\" name=\"/T/X64\"/>\n\
         </Statistics>\n"
    );

    let mut reg = Registry::new();
    reg.register_owned(
        SampleDef::new("/Sw\"x", StamType::X8Reset, StamUnit::Pct).description("A <b> & 'c' \"d\""),
    )?;
    reg.register_owned(
        SampleDef::new("/P", StamType::Profile, StamUnit::TicksPerCall).description("plain"),
    )?;
    reg.register_owned(SampleDef::new("/Q", StamType::U16, StamUnit::Hz))?;
    let none = Backing::new();
    assert_eq!(
        reg.xml("*", true, &none)?,
        "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n\
         <Statistics>\n\
         <Profile cPeriods=\"0\" cTicks=\"0\" unit=\"ticks/call\" name=\"/P\" desc=\"plain\"/>\n\
         <U16 val=\"0\" unit=\"Hz\" name=\"/Q\"/>\n\
         <X8 val=\"0x0\" unit=\"%\" name=\"/Sw&quot;x\" desc=\"A &lt;b&gt; &amp; &apos;c&apos; &quot;d&quot;\"/>\n\
         </Statistics>\n"
    );
    assert!(!reg.xml("*", false, &none)?.contains("desc="));
    Ok(())
}

#[test]
fn json_round_trip() -> Result<(), Box<dyn std::error::Error>> {
    let mut reg = Registry::new();
    let c = reg.register_owned(
        SampleDef::new("/A/Count", StamType::Counter, StamUnit::Calls).description("d"),
    )?;
    let p = reg.register_owned(SampleDef::new(
        "/A/Prof",
        StamType::ProfileAdv,
        StamUnit::TicksPerCall,
    ))?;
    reg.register_owned(
        SampleDef::new("/A/Flag", StamType::Bool, StamUnit::None).visibility(StamVisibility::Used),
    )?;
    reg.register_owned(SampleDef::new(
        "/A/Ratio",
        StamType::RatioU32Reset,
        StamUnit::GoodBad,
    ))?;
    reg.register_owned(SampleDef::new("/A/X", StamType::X32, StamUnit::Bytes))?;
    reg.owned_mut::<StamCounter>(c)?.add(5);
    reg.owned_mut::<StamProfile>(p)?.add_period(9);
    let none = Backing::new();
    let json = reg.json("*", &none)?;
    assert_eq!(
        json,
        concat!(
            r#"{"samples":["#,
            r#"{"name":"/A/Count","type":"COUNTER","unit":"CALLS","visibility":"ALWAYS","description":"d","value":{"counter":{"c":5}}},"#,
            r#"{"name":"/A/Flag","type":"BOOL","unit":"NONE","visibility":"USED","value":{"bool":false}},"#,
            r#"{"name":"/A/Prof","type":"PROFILE_ADV","unit":"TICKS_PER_CALL","visibility":"ALWAYS","value":{"profile":{"periods":1,"ticks":9,"ticks_max":9,"ticks_min":9}}},"#,
            r#"{"name":"/A/Ratio","type":"RATIO_U32_RESET","unit":"GOOD_BAD","visibility":"ALWAYS","value":{"ratio":{"a":0,"b":0}}},"#,
            r#"{"name":"/A/X","type":"X32","unit":"BYTES","visibility":"ALWAYS","value":{"unsigned":0}}"#,
            "]}"
        )
    );
    let snap = Snapshot::from_json(&json)?;
    assert_eq!(snap, reg.snapshot("*", &none)?);
    assert_eq!(snap.to_json()?, json);
    // A snapshot renders exactly like the registry.
    assert_eq!(snap.print(), reg.print("*", &none)?);
    assert_eq!(snap.xml(true), reg.xml("*", true, &none)?);
    assert_eq!(snap.prometheus(), reg.prometheus("*", &none)?);
    assert_eq!(
        snap.samples[0],
        SampleValue {
            name: "/A/Count".into(),
            ty: StamType::Counter,
            unit: StamUnit::Calls,
            visibility: StamVisibility::Always,
            description: Some("d".into()),
            value: Value::Counter { c: 5 },
        }
    );
    // u64::MAX survives JSON.
    let big = Snapshot {
        samples: vec![SampleValue {
            name: "/M".into(),
            ty: StamType::Profile,
            unit: StamUnit::Ticks,
            visibility: StamVisibility::Always,
            description: None,
            value: Value::Profile {
                periods: u64::MAX,
                ticks: u64::MAX,
                ticks_max: Some(u64::MAX),
                ticks_min: Some(u64::MAX),
            },
        }],
    };
    assert_eq!(Snapshot::from_json(&big.to_json()?)?, big);
    assert!(Snapshot::from_json("{\"samples\":[{}]}").is_err());
    Ok(())
}

#[test]
fn prometheus_exposition() -> R {
    let (reg, rg) = full_registry()?;
    let s = busy_stats();
    let mut reg2 = Registry::new();
    reg2.register_owned(SampleDef::new(
        "/Empty",
        StamType::Profile,
        StamUnit::TicksPerCall,
    ))?;
    reg2.register_owned(SampleDef::new(
        "/Odd\"name\nx",
        StamType::Counter,
        StamUnit::None,
    ))?;
    let text = reg.prometheus(
        "/T/Counter|/T/Profile|/T/Ratio|/T/U8|/T/Bool|/T/X64",
        &Backing::new().with_struct(rg, &s),
    )?;
    assert_eq!(
        text,
        "# HELP stam_counter_total STAM counter samples (COUNTER).\n\
         # TYPE stam_counter_total counter\n\
         stam_counter_total{path=\"/T/Counter\",unit=\"count\"} 7\n\
         # HELP stam_profile_periods_total Periods recorded by STAM profile samples (PROFILE, PROFILE_ADV).\n\
         # TYPE stam_profile_periods_total counter\n\
         stam_profile_periods_total{path=\"/T/Profile\",unit=\"count\"} 2\n\
         # HELP stam_profile_ticks_total Sum of the period lengths of STAM profile samples, in the numerator of the unit label.\n\
         # TYPE stam_profile_ticks_total counter\n\
         stam_profile_ticks_total{path=\"/T/Profile\",unit=\"count\"} 40\n\
         # HELP stam_profile_ticks_max Longest period of a STAM profile sample (absent before the first period).\n\
         # TYPE stam_profile_ticks_max gauge\n\
         stam_profile_ticks_max{path=\"/T/Profile\",unit=\"count\"} 30\n\
         # HELP stam_profile_ticks_min Shortest period of a STAM profile sample (absent before the first period).\n\
         # TYPE stam_profile_ticks_min gauge\n\
         stam_profile_ticks_min{path=\"/T/Profile\",unit=\"count\"} 10\n\
         # HELP stam_ratio_a Numerator of STAM ratio samples (RATIO_U32, RATIO_U32_RESET).\n\
         # TYPE stam_ratio_a gauge\n\
         stam_ratio_a{path=\"/T/Ratio\",unit=\"count\"} 1\n\
         # HELP stam_ratio_b Denominator of STAM ratio samples (RATIO_U32, RATIO_U32_RESET).\n\
         # TYPE stam_ratio_b gauge\n\
         stam_ratio_b{path=\"/T/Ratio\",unit=\"count\"} 2\n\
         # HELP stam_value STAM scalar samples (U8 to X64, with and without _RESET; BOOL as 0 or 1).\n\
         # TYPE stam_value gauge\n\
         stam_value{path=\"/T/Bool\",unit=\"count\"} 1\n\
         stam_value{path=\"/T/U8\",unit=\"count\"} 8\n\
         stam_value{path=\"/T/X64\",unit=\"count\"} 244837814042624\n"
    );
    assert_eq!(
        reg2.prometheus("", &Backing::new())?,
        "# HELP stam_counter_total STAM counter samples (COUNTER).\n\
         # TYPE stam_counter_total counter\n\
         stam_counter_total{path=\"/Odd\\\"name\\nx\",unit=\"\"} 0\n\
         # HELP stam_profile_periods_total Periods recorded by STAM profile samples (PROFILE, PROFILE_ADV).\n\
         # TYPE stam_profile_periods_total counter\n\
         stam_profile_periods_total{path=\"/Empty\",unit=\"ticks/call\"} 0\n\
         # HELP stam_profile_ticks_total Sum of the period lengths of STAM profile samples, in the numerator of the unit label.\n\
         # TYPE stam_profile_ticks_total counter\n\
         stam_profile_ticks_total{path=\"/Empty\",unit=\"ticks/call\"} 0\n"
    );
    assert_eq!(Registry::new().prometheus("", &Backing::new())?, "");
    Ok(())
}
