//! Flat multiboot v1 images with the a.out-kludge header.
//!
//! QEMU's `-kernel` loader accepts a flat binary when the multiboot header
//! (Multiboot Specification 0.6.96, §3.1) sets flag bit 16 and supplies the
//! load addresses itself: `header_addr`, `load_addr`, `load_end_addr`,
//! `bss_end_addr` and `entry_addr`. The file is then copied byte for byte to
//! `load_addr` and the loader jumps to `entry_addr` in 32-bit protected mode
//! with paging off, `EAX = 0x2BADB002` and `EBX` pointing at the multiboot
//! information structure.
//!
//! [`ImageBuilder`] places named byte blobs at caller-chosen physical
//! addresses in `[1 MiB, 64 MiB)`, refuses overlaps with an error naming both
//! ranges, and lays the file out from [`LOAD_ADDR`] (the header sits in its
//! first bytes).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Multiboot v1 header magic (`MULTIBOOT_HEADER_MAGIC`).
pub const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// Value the loader leaves in EAX (`MULTIBOOT_BOOTLOADER_MAGIC`).
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Header flag: align modules on page boundaries.
pub const MB_FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: pass memory information in the info structure.
pub const MB_FLAG_MEMINFO: u32 = 1 << 1;
/// Header flag: the address fields of the header are valid (the a.out kludge).
pub const MB_FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Flags this builder writes.
pub const MB_FLAGS: u32 = MB_FLAG_PAGE_ALIGN | MB_FLAG_MEMINFO | MB_FLAG_AOUT_KLUDGE;

/// Physical address the image is loaded at (and where its header lives).
pub const LOAD_ADDR: u32 = 0x0010_0000;
/// First physical address a blob may not reach (QEMU's default RAM is 128 MiB;
/// the loader puts its own structures after the image).
pub const PHYS_LIMIT: u32 = 0x0400_0000;
/// Size of the multiboot header with the a.out-kludge fields.
pub const HEADER_SIZE: u32 = 32;
/// Name of the range the header occupies, as overlap errors report it.
pub const HEADER_NAME: &str = "multiboot header";

/// A half-open physical range `[start, end)` with the name of its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedRange {
    /// Owner of the range (a blob name).
    pub name: String,
    /// First byte.
    pub start: u32,
    /// One past the last byte.
    pub end: u32,
}

impl fmt::Display for NamedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` [{:#010x}, {:#010x})",
            self.name, self.start, self.end
        )
    }
}

/// Why a blob cannot be placed or the image cannot be produced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// The blob starts below the load address.
    #[error("blob `{name}` at {phys:#010x} lies below the load address {LOAD_ADDR:#010x}")]
    BelowLoadAddress {
        /// Blob name.
        name: String,
        /// Requested physical address.
        phys: u32,
    },
    /// The blob ends above [`PHYS_LIMIT`] (or wraps around 4 GiB).
    #[error(
        "blob `{name}` at {phys:#010x} with {len:#x} bytes ends beyond the limit {PHYS_LIMIT:#010x}"
    )]
    AboveLimit {
        /// Blob name.
        name: String,
        /// Requested physical address.
        phys: u32,
        /// Blob length.
        len: usize,
    },
    /// The blob has no bytes.
    #[error("blob `{name}` at {phys:#010x} is empty")]
    Empty {
        /// Blob name.
        name: String,
        /// Requested physical address.
        phys: u32,
    },
    /// Two blobs (or a blob and the header) share bytes.
    #[error("{new} overlaps {existing}")]
    Overlap {
        /// The range being placed.
        new: NamedRange,
        /// The range already there.
        existing: NamedRange,
    },
    /// The entry point is outside every placed blob.
    #[error("entry point {entry:#010x} is not inside any placed blob")]
    EntryOutside {
        /// The entry address.
        entry: u32,
    },
    /// `bss_end` lies beyond [`PHYS_LIMIT`].
    #[error("bss end {bss_end:#010x} lies beyond the limit {PHYS_LIMIT:#010x}")]
    BssBeyondLimit {
        /// The requested bss end.
        bss_end: u32,
    },
}

/// One placed blob.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob {
    /// Name used in errors and layout listings.
    pub name: String,
    /// Physical load address.
    pub phys: u32,
    /// Contents.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blob")
            .field("name", &self.name)
            .field("phys", &format_args!("{:#010x}", self.phys))
            .field("len", &format_args!("{:#x}", self.bytes.len()))
            .finish()
    }
}

impl Blob {
    /// The blob's physical range.
    pub fn range(&self) -> NamedRange {
        NamedRange {
            name: self.name.clone(),
            start: self.phys,
            // Checked against PHYS_LIMIT when placed.
            end: self
                .phys
                .saturating_add(u32::try_from(self.bytes.len()).unwrap_or(u32::MAX)),
        }
    }
}

/// Builds a flat multiboot image loaded at [`LOAD_ADDR`].
#[derive(Debug, Default)]
pub struct ImageBuilder {
    blobs: Vec<Blob>,
    bss_end: u32,
}

impl ImageBuilder {
    /// An empty image (only the header range is reserved).
    pub fn new() -> Self {
        Self::default()
    }

    fn header_range() -> NamedRange {
        NamedRange {
            name: HEADER_NAME.to_owned(),
            start: LOAD_ADDR,
            end: LOAD_ADDR + HEADER_SIZE,
        }
    }

    /// Places `bytes` at physical address `phys`.
    pub fn place(
        &mut self,
        name: impl Into<String>,
        phys: u32,
        bytes: Vec<u8>,
    ) -> Result<(), ImageError> {
        let name = name.into();
        if bytes.is_empty() {
            return Err(ImageError::Empty { name, phys });
        }
        if phys < LOAD_ADDR {
            return Err(ImageError::BelowLoadAddress { name, phys });
        }
        let end = u32::try_from(bytes.len())
            .ok()
            .and_then(|len| phys.checked_add(len))
            .filter(|&end| end <= PHYS_LIMIT);
        let Some(end) = end else {
            return Err(ImageError::AboveLimit {
                name,
                phys,
                len: bytes.len(),
            });
        };
        let new = NamedRange {
            name,
            start: phys,
            end,
        };
        let header = Self::header_range();
        let clash = std::iter::once(header)
            .chain(self.blobs.iter().map(Blob::range))
            .find(|r| r.start < new.end && new.start < r.end);
        if let Some(existing) = clash {
            return Err(ImageError::Overlap { new, existing });
        }
        self.blobs.push(Blob {
            name: new.name,
            phys,
            bytes,
        });
        Ok(())
    }

    /// Asks the loader to zero memory up to `bss_end` (exclusive) beyond the
    /// loaded bytes.
    pub fn set_bss_end(&mut self, bss_end: u32) -> Result<(), ImageError> {
        if bss_end > PHYS_LIMIT {
            return Err(ImageError::BssBeyondLimit { bss_end });
        }
        self.bss_end = bss_end;
        Ok(())
    }

    /// The blobs placed so far, in placement order.
    pub fn blobs(&self) -> &[Blob] {
        &self.blobs
    }

    /// Produces the image bytes, entering at `entry`.
    pub fn build(&self, entry: u32) -> Result<Vec<u8>, ImageError> {
        let inside = self
            .blobs
            .iter()
            .map(Blob::range)
            .any(|r| r.start <= entry && entry < r.end);
        if !inside {
            return Err(ImageError::EntryOutside { entry });
        }
        let load_end = self
            .blobs
            .iter()
            .map(|b| b.range().end)
            .max()
            .unwrap_or(LOAD_ADDR + HEADER_SIZE)
            .max(LOAD_ADDR + HEADER_SIZE);
        let bss_end = self.bss_end.max(load_end);
        let mut out = vec![0u8; (load_end - LOAD_ADDR) as usize];
        let checksum = 0u32.wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(MB_FLAGS));
        let header = [
            MULTIBOOT_MAGIC,
            MB_FLAGS,
            checksum,
            LOAD_ADDR, // header_addr
            LOAD_ADDR, // load_addr
            load_end,  // load_end_addr
            bss_end,   // bss_end_addr
            entry,     // entry_addr
        ];
        for (i, word) in header.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        for blob in &self.blobs {
            let off = (blob.phys - LOAD_ADDR) as usize;
            out[off..off + blob.bytes.len()].copy_from_slice(&blob.bytes);
        }
        Ok(out)
    }
}

/// An image written to a uniquely named temporary file, removed on drop.
#[derive(Debug)]
pub struct TempImage {
    path: PathBuf,
}

impl TempImage {
    /// Writes `bytes` to a new file in the system temporary directory.
    pub fn write(bytes: &[u8]) -> std::io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = dir.join(format!("wstb-{}-{n}-{nanos:08x}.bin", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    let image = Self { path };
                    write_all(&mut file, bytes)?;
                    return Ok(image);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Where the image lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn write_all(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all(bytes)?;
    file.flush()
}

impl Drop for TempImage {
    fn drop(&mut self) {
        // Best effort: a stale file in the temp directory harms nothing.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(bytes: &[u8], i: usize) -> u32 {
        u32::from_le_bytes([
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ])
    }

    #[test]
    fn header_is_valid_and_blobs_land_at_their_offsets() {
        let mut b = ImageBuilder::new();
        b.place("code", 0x0010_1000, vec![0x90, 0xc3]).unwrap();
        b.place("data", 0x0010_3000, vec![1, 2, 3, 4]).unwrap();
        b.set_bss_end(0x0010_8000).unwrap();
        let img = b.build(0x0010_1000).unwrap();
        assert_eq!(word(&img, 0), MULTIBOOT_MAGIC);
        assert_eq!(word(&img, 1) & MB_FLAG_AOUT_KLUDGE, MB_FLAG_AOUT_KLUDGE);
        assert_eq!(
            word(&img, 0)
                .wrapping_add(word(&img, 1))
                .wrapping_add(word(&img, 2)),
            0
        );
        assert_eq!(word(&img, 3), LOAD_ADDR);
        assert_eq!(word(&img, 4), LOAD_ADDR);
        assert_eq!(word(&img, 5), 0x0010_3004);
        assert_eq!(word(&img, 6), 0x0010_8000);
        assert_eq!(word(&img, 7), 0x0010_1000);
        assert_eq!(img.len(), 0x3004);
        assert_eq!(&img[0x1000..0x1002], &[0x90, 0xc3]);
        assert_eq!(&img[0x3000..0x3004], &[1, 2, 3, 4]);
    }

    #[test]
    fn overlaps_name_both_ranges() {
        let mut b = ImageBuilder::new();
        b.place("first", 0x0020_0000, vec![0; 0x100]).unwrap();
        let err = b.place("second", 0x0020_00ff, vec![0; 2]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`second` [0x002000ff, 0x00200101)"), "{msg}");
        assert!(msg.contains("`first` [0x00200000, 0x00200100)"), "{msg}");
        let err = b.place("early", LOAD_ADDR + 8, vec![0; 4]).unwrap_err();
        assert!(err.to_string().contains(HEADER_NAME), "{err}");
        // Touching ranges are fine.
        b.place("third", 0x0020_0100, vec![0; 4]).unwrap();
    }

    #[test]
    fn bad_addresses_are_typed_errors() {
        let mut b = ImageBuilder::new();
        assert_eq!(
            b.place("low", 0x000f_f000, vec![0]),
            Err(ImageError::BelowLoadAddress {
                name: "low".into(),
                phys: 0x000f_f000
            })
        );
        assert!(matches!(
            b.place("high", PHYS_LIMIT - 1, vec![0, 0]),
            Err(ImageError::AboveLimit { .. })
        ));
        assert!(matches!(
            b.place("empty", 0x0020_0000, vec![]),
            Err(ImageError::Empty { .. })
        ));
        assert_eq!(
            b.build(0x0030_0000),
            Err(ImageError::EntryOutside { entry: 0x0030_0000 })
        );
    }

    #[test]
    fn temp_image_round_trips_and_is_removed() {
        let path;
        {
            let t = TempImage::write(&[1, 2, 3]).unwrap();
            path = t.path().to_owned();
            assert_eq!(std::fs::read(&path).unwrap(), vec![1, 2, 3]);
        }
        assert!(!path.exists());
    }
}
