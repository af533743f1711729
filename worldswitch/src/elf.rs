//! A symbol-only ELF64 x86-64 file for gdb's `symbol-file`.
//!
//! The file has no program headers and no contents: one `SHT_NOBITS`
//! section per [`Area`] (an address range, code or data), a `.symtab` whose
//! symbols sit in the section that holds their address (`SHN_ABS` when none
//! does) and its `.strtab`. gdb then names an address inside an area as
//! `symbol + offset` — in `info symbol`, at every stop and in `x/i` — which it
//! cannot do for absolute symbols alone. Overlapping areas are merged into one
//! section (the same bytes seen at one address under two names).
//!
//! [`read`] parses such a file back (the symbols and the sections holding
//! them): the tests use it, and so does `gdb-x` to name the addresses it
//! decodes.

use std::collections::BTreeMap;

use thiserror::Error;

/// An address range gdb should name symbols in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Area {
    /// Section name (without the leading dot; characters outside
    /// `[A-Za-z0-9_.]` become `_`).
    pub name: String,
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Instructions live here (`SHF_EXECINSTR`); data otherwise.
    pub code: bool,
}

/// A named address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// The name gdb shows.
    pub name: String,
    /// The address.
    pub addr: u64,
    /// A code label (`STT_FUNC`); data (`STT_OBJECT`) otherwise.
    pub code: bool,
}

/// A symbol read back by [`read`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSymbol {
    /// Its name.
    pub name: String,
    /// Its address.
    pub addr: u64,
    /// Its size (up to the next symbol of its section, or the section's end).
    pub size: u64,
    /// The section holding it; `None` for an absolute symbol.
    pub section: Option<String>,
}

/// Why a symbol file cannot be written or read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ElfError {
    /// An area is empty or ends before it starts.
    #[error("area {name} {start:#x}..{end:#x} is empty")]
    EmptyArea {
        /// The area.
        name: String,
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// A name is empty or holds a NUL byte.
    #[error("symbol name {0:?} is empty or holds a NUL byte")]
    BadName(String),
    /// Two symbols have one name.
    #[error("symbol {0} is defined twice")]
    Duplicate(String),
    /// More sections or bytes than ELF can index.
    #[error("the symbol file would be too large ({0})")]
    TooLarge(&'static str),
    /// The bytes are not a symbol file of this shape.
    #[error("not a symbol file: {0}")]
    Malformed(&'static str),
}

const EHDR: usize = 64;
const SHDR: usize = 64;
const SYM: usize = 24;
const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHT_NOBITS: u32 = 8;
const SHF_WRITE: u64 = 1;
const SHF_ALLOC: u64 = 2;
const SHF_EXECINSTR: u64 = 4;
const SHN_ABS: u16 = 0xfff1;
const SHN_LORESERVE: usize = 0xff00;
const STB_GLOBAL: u8 = 1;
const STT_OBJECT: u8 = 1;
const STT_FUNC: u8 = 2;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

/// One `SHT_NOBITS` section: merged areas.
#[derive(Debug)]
struct Sect {
    name: String,
    start: u64,
    end: u64,
    code: bool,
}

/// A string table under construction.
#[derive(Default)]
struct StrTab {
    bytes: Vec<u8>,
}

impl StrTab {
    fn new() -> Self {
        Self { bytes: vec![0] }
    }

    fn add(&mut self, s: &str) -> Result<u32, ElfError> {
        let at = u32::try_from(self.bytes.len()).map_err(|_| ElfError::TooLarge("strings"))?;
        self.bytes.extend_from_slice(s.as_bytes());
        self.bytes.push(0);
        Ok(at)
    }
}

fn section_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Sorts the areas and merges the overlapping ones.
fn merge(areas: &[Area]) -> Result<Vec<Sect>, ElfError> {
    let mut sorted: Vec<&Area> = areas.iter().collect();
    for a in &sorted {
        if a.end <= a.start {
            return Err(ElfError::EmptyArea {
                name: a.name.clone(),
                start: a.start,
                end: a.end,
            });
        }
    }
    sorted.sort_by_key(|a| (a.start, a.end));
    let mut out: Vec<Sect> = Vec::new();
    for a in sorted {
        match out.last_mut() {
            Some(last) if a.start < last.end => {
                last.end = last.end.max(a.end);
                last.code |= a.code;
                last.name = format!("{}+{}", last.name, section_name(&a.name));
            }
            _ => out.push(Sect {
                name: format!(".{}", section_name(&a.name)),
                start: a.start,
                end: a.end,
                code: a.code,
            }),
        }
    }
    if out.len() + 4 >= SHN_LORESERVE {
        return Err(ElfError::TooLarge("sections"));
    }
    Ok(out)
}

fn push16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn push32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn push64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn align8(b: &mut Vec<u8>) {
    while b.len() % 8 != 0 {
        b.push(0);
    }
}

fn to_u64(n: usize) -> Result<u64, ElfError> {
    u64::try_from(n).map_err(|_| ElfError::TooLarge("offset"))
}

fn to_u16(n: usize, what: &'static str) -> Result<u16, ElfError> {
    u16::try_from(n).map_err(|_| ElfError::TooLarge(what))
}

/// A section header's fields.
#[derive(Default)]
struct Shdr {
    name: u32,
    kind: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
    info: u32,
    align: u64,
    entsize: u64,
}

fn push_shdr(b: &mut Vec<u8>, h: &Shdr) {
    push32(b, h.name);
    push32(b, h.kind);
    push64(b, h.flags);
    push64(b, h.addr);
    push64(b, h.offset);
    push64(b, h.size);
    push32(b, h.link);
    push32(b, h.info);
    push64(b, h.align);
    push64(b, h.entsize);
}

/// The symbol table: every symbol's section index and size (up to the next
/// symbol address in its section, or the section's end; 0 for absolute ones).
fn symtab(sects: &[Sect], symbols: &[Symbol], names: &mut StrTab) -> Result<Vec<u8>, ElfError> {
    let mut seen = BTreeMap::new();
    for s in symbols {
        if s.name.is_empty() || s.name.contains('\0') {
            return Err(ElfError::BadName(s.name.clone()));
        }
        if seen.insert(s.name.as_str(), ()).is_some() {
            return Err(ElfError::Duplicate(s.name.clone()));
        }
    }
    let home = |addr: u64| sects.iter().position(|t| t.start <= addr && addr < t.end);
    let mut b = vec![0u8; SYM];
    for s in symbols {
        let (shndx, size) = match home(s.addr) {
            Some(i) => {
                let t = &sects[i];
                let next = symbols
                    .iter()
                    .map(|o| o.addr)
                    .filter(|&a| a > s.addr && a < t.end)
                    .min()
                    .unwrap_or(t.end);
                (to_u16(i + 1, "sections")?, next - s.addr)
            }
            None => (SHN_ABS, 0),
        };
        push32(&mut b, names.add(&s.name)?);
        b.push((STB_GLOBAL << 4) | if s.code { STT_FUNC } else { STT_OBJECT });
        b.push(0);
        push16(&mut b, shndx);
        push64(&mut b, s.addr);
        push64(&mut b, size);
    }
    Ok(b)
}

/// Writes the symbol file: an ELF64 x86-64 executable with one `NOBITS`
/// section per (merged) area, the symbols and the string tables.
///
/// # Errors
/// An empty area, an empty or duplicate symbol name, or more than ELF can
/// index.
pub fn write(areas: &[Area], symbols: &[Symbol]) -> Result<Vec<u8>, ElfError> {
    let sects = merge(areas)?;
    let mut strtab = StrTab::new();
    let syms = symtab(&sects, symbols, &mut strtab)?;
    let mut shstr = StrTab::new();
    let sect_names = sects
        .iter()
        .map(|s| shstr.add(&s.name))
        .collect::<Result<Vec<_>, _>>()?;
    let (n_symtab, n_strtab, n_shstrtab) = (
        shstr.add(".symtab")?,
        shstr.add(".strtab")?,
        shstr.add(".shstrtab")?,
    );

    let mut b = vec![0u8; EHDR];
    let sym_off = to_u64(b.len())?;
    b.extend_from_slice(&syms);
    let str_off = to_u64(b.len())?;
    b.extend_from_slice(&strtab.bytes);
    let shstr_off = to_u64(b.len())?;
    b.extend_from_slice(&shstr.bytes);
    align8(&mut b);
    let sh_off = to_u64(b.len())?;

    let symtab_index = sects.len() + 1;
    push_shdr(&mut b, &Shdr::default());
    for (s, &name) in sects.iter().zip(&sect_names) {
        push_shdr(
            &mut b,
            &Shdr {
                name,
                kind: SHT_NOBITS,
                flags: SHF_ALLOC | if s.code { SHF_EXECINSTR } else { SHF_WRITE },
                addr: s.start,
                offset: sym_off,
                size: s.end - s.start,
                align: 1,
                ..Shdr::default()
            },
        );
    }
    let strtab_index =
        u32::try_from(symtab_index + 1).map_err(|_| ElfError::TooLarge("sections"))?;
    push_shdr(
        &mut b,
        &Shdr {
            name: n_symtab,
            kind: SHT_SYMTAB,
            offset: sym_off,
            size: to_u64(syms.len())?,
            link: strtab_index,
            // Index of the first non-local symbol: all but the null one are global.
            info: 1,
            align: 8,
            entsize: SYM as u64,
            ..Shdr::default()
        },
    );
    for (name, off, len) in [
        (n_strtab, str_off, strtab.bytes.len()),
        (n_shstrtab, shstr_off, shstr.bytes.len()),
    ] {
        push_shdr(
            &mut b,
            &Shdr {
                name,
                kind: SHT_STRTAB,
                offset: off,
                size: to_u64(len)?,
                align: 1,
                ..Shdr::default()
            },
        );
    }
    let shnum = to_u16(symtab_index + 3, "sections")?;
    b[..EHDR].copy_from_slice(&elf_header(sh_off, shnum));
    Ok(b)
}

/// The ELF64 header of an x86-64 executable without program headers whose
/// `shnum` section headers start at `sh_off`, the last one `.shstrtab`.
fn elf_header(sh_off: u64, shnum: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(EHDR);
    h.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    h.extend_from_slice(&[0; 8]);
    push16(&mut h, ET_EXEC);
    push16(&mut h, EM_X86_64);
    push32(&mut h, 1);
    push64(&mut h, 0); // e_entry
    push64(&mut h, 0); // e_phoff
    push64(&mut h, sh_off);
    push32(&mut h, 0); // e_flags
    push16(&mut h, EHDR as u16);
    push16(&mut h, 0); // e_phentsize
    push16(&mut h, 0); // e_phnum
    push16(&mut h, SHDR as u16);
    push16(&mut h, shnum);
    push16(&mut h, shnum.saturating_sub(1)); // e_shstrndx
    h
}

/// Little-endian reads that fail instead of panicking.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    /// The `N` bytes at `at + field`.
    fn get<const N: usize>(&self, at: u64, field: u64) -> Result<[u8; N], ElfError> {
        let at = at
            .checked_add(field)
            .and_then(|a| usize::try_from(a).ok())
            .ok_or(ElfError::Malformed("offset"))?;
        let end = at.checked_add(N).ok_or(ElfError::Malformed("offset"))?;
        self.0
            .get(at..end)
            .and_then(|s| s.try_into().ok())
            .ok_or(ElfError::Malformed("truncated"))
    }
    fn u16(&self, at: u64, field: u64) -> Result<u16, ElfError> {
        self.get(at, field).map(u16::from_le_bytes)
    }
    fn u32(&self, at: u64, field: u64) -> Result<u32, ElfError> {
        self.get(at, field).map(u32::from_le_bytes)
    }
    fn u64(&self, at: u64, field: u64) -> Result<u64, ElfError> {
        self.get(at, field).map(u64::from_le_bytes)
    }
    /// The NUL-terminated string at `table + at`.
    fn cstr(&self, table: u64, at: u32) -> Result<String, ElfError> {
        let start = table
            .checked_add(u64::from(at))
            .and_then(|a| usize::try_from(a).ok())
            .ok_or(ElfError::Malformed("name"))?;
        let rest = self.0.get(start..).ok_or(ElfError::Malformed("name"))?;
        let len = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or(ElfError::Malformed("unterminated name"))?;
        Ok(String::from_utf8_lossy(&rest[..len]).into_owned())
    }
}

/// One section header read back.
struct ReadShdr {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

fn read_shdr(b: &Bytes<'_>, at: u64) -> Result<ReadShdr, ElfError> {
    Ok(ReadShdr {
        name: b.u32(at, 0)?,
        kind: b.u32(at, 4)?,
        offset: b.u64(at, 24)?,
        size: b.u64(at, 32)?,
        link: b.u32(at, 40)?,
    })
}

/// `base + i * size`, or [`ElfError::Malformed`] past `u64`.
fn at(base: u64, i: u64, size: usize) -> Result<u64, ElfError> {
    i.checked_mul(size as u64)
        .and_then(|o| base.checked_add(o))
        .ok_or(ElfError::Malformed("offset"))
}

/// Reads the symbols of an ELF64 little-endian file (as [`write()`] makes
/// them), in table order, each with the name of its section.
///
/// # Errors
/// [`ElfError::Malformed`] for anything else.
pub fn read(bytes: &[u8]) -> Result<Vec<ReadSymbol>, ElfError> {
    let b = Bytes(bytes);
    if b.get::<6>(0, 0)? != [0x7f, b'E', b'L', b'F', 2, 1] {
        return Err(ElfError::Malformed("not ELF64 little-endian"));
    }
    let shoff = b.u64(0x28, 0)?;
    let shnum = u64::from(b.u16(0x3c, 0)?);
    let shstrndx = u64::from(b.u16(0x3e, 0)?);
    let shdr = |i: u64| read_shdr(&b, at(shoff, i, SHDR)?);
    let shstr = shdr(shstrndx)?;
    let name_of = |i: u64| -> Result<String, ElfError> { b.cstr(shstr.offset, shdr(i)?.name) };
    let mut out = Vec::new();
    for i in 0..shnum {
        let h = shdr(i)?;
        if h.kind != SHT_SYMTAB {
            continue;
        }
        let strs = shdr(u64::from(h.link))?;
        for k in 1..h.size / SYM as u64 {
            let at = at(h.offset, k, SYM)?;
            let shndx = b.u16(at, 6)?;
            let section = match shndx {
                SHN_ABS => None,
                n if u64::from(n) < shnum => Some(name_of(u64::from(n))?),
                _ => return Err(ElfError::Malformed("symbol section index")),
            };
            out.push(ReadSymbol {
                name: b.cstr(strs.offset, b.u32(at, 0)?)?,
                addr: b.u64(at, 8)?,
                size: b.u64(at, 16)?,
                section,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn area(name: &str, start: u64, end: u64, code: bool) -> Area {
        Area {
            name: name.into(),
            start,
            end,
            code,
        }
    }

    fn sym(name: &str, addr: u64) -> Symbol {
        Symbol {
            name: name.into(),
            addr,
            code: true,
        }
    }

    #[test]
    fn symbols_come_back_in_their_sections_with_sizes() {
        let areas = [
            area("HC view", 0xc040_1dc0, 0xc040_22a3, true),
            area("kernel data", 0x10_1000, 0x10_2000, false),
        ];
        let syms = [
            sym("vmmR0HostToGuest@HC", 0xc040_1dc0),
            sym("IDEnterTarget@HC", 0xc040_2000),
            sym("magic_page", 0x10_1000),
            sym("LAPIC", 0xfee0_0000),
        ];
        let elf = write(&areas, &syms).unwrap();
        let back = read(&elf).unwrap();
        let got: Vec<(&str, u64, u64, Option<&str>)> = back
            .iter()
            .map(|s| (s.name.as_str(), s.addr, s.size, s.section.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("vmmR0HostToGuest@HC", 0xc040_1dc0, 0x240, Some(".HC_view")),
                ("IDEnterTarget@HC", 0xc040_2000, 0x2a3, Some(".HC_view")),
                ("magic_page", 0x10_1000, 0x1000, Some(".kernel_data")),
                ("LAPIC", 0xfee0_0000, 0, None),
            ]
        );
        // The header gdb and readelf check.
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), EM_X86_64);
        assert_eq!(u16::from_le_bytes([elf[16], elf[17]]), ET_EXEC);
    }

    #[test]
    fn overlapping_areas_become_one_section() {
        let areas = [
            area("ID", 0x40_1dc0, 0x40_22a3, true),
            area("switcher code", 0x40_0000, 0x40_2000, false),
            area("far", 0x50_0000, 0x50_1000, true),
        ];
        let elf = write(&areas, &[sym("a", 0x40_2100), sym("b", 0x50_0000)]).unwrap();
        let back = read(&elf).unwrap();
        assert_eq!(back[0].section.as_deref(), Some(".switcher_code+ID"));
        assert_eq!(back[0].size, 0x40_22a3 - 0x40_2100);
        assert_eq!(back[1].section.as_deref(), Some(".far"));
    }

    #[test]
    fn bad_input_is_refused_by_name() {
        assert_eq!(
            write(&[area("x", 5, 5, true)], &[]),
            Err(ElfError::EmptyArea {
                name: "x".into(),
                start: 5,
                end: 5
            })
        );
        assert_eq!(
            write(&[], &[sym("a", 1), sym("a", 2)]),
            Err(ElfError::Duplicate("a".into()))
        );
        assert_eq!(
            write(&[], &[sym("", 1)]),
            Err(ElfError::BadName(String::new()))
        );
        assert!(matches!(
            read(b"\x7fELF\x01\x01"),
            Err(ElfError::Malformed(_))
        ));
        let mut elf = write(&[area("x", 0, 16, true)], &[sym("a", 1)]).unwrap();
        elf.truncate(elf.len() - 40);
        assert!(matches!(read(&elf), Err(ElfError::Malformed(_))));
    }
}
