//! The QEMU testbed for the world switchers.
//!
//! Nothing in user space can run `mov cr0` or `wrmsr`, so every switcher is
//! executed for real under QEMU's full-system emulator (TCG). This crate
//! provides the host side of that arrangement:
//!
//! - [`image`]: flat multiboot v1 images (a.out kludge) with blobs at chosen
//!   physical addresses and overlap detection;
//! - [`paging`]: the host page tables (32-bit and PAE) as data, with a
//!   software walker;
//! - [`hostkernel`]: a 32-bit host kernel generated with iced-x86 that plays
//!   the embedding hypervisor — it sets up a realistic host (paging, its own
//!   GDT/IDT/TSS/LDT, EFER, SYSENTER_CS, LAPIC LVTs in NMI mode), calls a
//!   C-callable switcher entry many times and proves the host comes back bit
//!   for bit (the role of VirtualBox's `VMMR0` calling `pfnHostToGuestR0`);
//! - [`farside`]: the code a switcher runs on the other side — the RC code
//!   of the 32-bit/PAE and the 64-bit hypervisor contexts, and the 64-bit
//!   helper the 32-bit/PAE → AMD64 switchers call in the intermediate
//!   context — which checks the switch from the inside and reports into a
//!   mailbox;
//! - [`scenario`]: a switcher built by the VMM core, its far side and a host
//!   kernel put together, run and judged (optionally deliberately broken by
//!   a [`scenario::Mutation`]);
//! - [`qemu`]: finds and runs `qemu-system-x86_64` with a timeout and
//!   classifies the exit ([`qemu::Outcome`]);
//! - [`transcript`]: the serial line protocol and its decoder
//!   ([`transcript::Report`]), including hex dumps decoded with zerocopy.
//!
//! # Example
//!
//! A dummy "switcher" that returns `cookie ^ 0x1234`, mapped at a host-virtual
//! address different from its physical one, called 1000 times for two VCPUs:
//!
//! ```no_run
//! use iced_x86::code_asm::*;
//! use integration::hostkernel::{Expected, HostKernelBuilder};
//! use integration::paging::HostMode;
//! use integration::qemu::{Outcome, QemuConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! const PHYS: u32 = 0x0080_0000;
//! const HC: u32 = 0xc000_0000;
//! let cookie = HC + 0x800; // the kernel writes the cookie here before each call
//! let mut a = CodeAssembler::new(32)?;
//! a.mov(eax, dword_ptr(cookie))?;
//! a.xor(eax, 0x1234)?;
//! a.ret()?;
//! let mut blob = a.assemble(u64::from(HC))?;
//! blob.resize(0x1000, 0);
//!
//! let testbed = HostKernelBuilder::new(HostMode::Pae)
//!     .blob_mapped("dummy", PHYS, HC, blob, true)
//!     .entry(HC)
//!     .cookie_at(cookie)
//!     .expect(Expected::CookieXor(0x1234))
//!     .vcpus([0x40, 0x40 + 2560])
//!     .trips(1000)
//!     .dump("dummy", HC, 16)
//!     .build()?;
//! let run = testbed.run(&QemuConfig::default())?;
//! assert_eq!(run.outcome, Outcome::Pass);
//! let summary = run.report.summary.expect("summary line");
//! println!("{} calls, {} instructions per call", summary.calls, summary.tsc_min);
//! # Ok(())
//! # }
//! ```
//!
//! For the protocol see [`transcript`]; for the checks see [`hostkernel`].

pub mod bochs;
pub mod cpumodel;
pub mod farside;
pub mod hostkernel;
pub mod image;
pub mod paging;
pub mod qemu;
pub mod scenario;
pub mod storm;
pub mod transcript;

pub use hostkernel::{Expected, HookCtx, HostKernelBuilder, Mapping, Testbed};
pub use paging::HostMode;
pub use qemu::{Outcome, QemuConfig, RunResult};
pub use transcript::Report;
