//! The QEMU side: the two symbols QEMU looks for (`qemu_plugin_version`,
//! `qemu_plugin_install`) and the callbacks.
//!
//! The plugin API functions (version 4, QEMU 9.2 to 10.0) are looked up in
//! the QEMU process with `dlsym` when QEMU installs the plugin, so the
//! library has no undefined symbols and the same crate links into ordinary
//! Rust programs as an `rlib`. The declarations follow QEMU's
//! `include/qemu/qemu-plugin.h`; from version 3 on `qemu_plugin_insn_data`
//! copies into a caller buffer.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

use crate::args::{self, PluginArgs};
use crate::class::{classify, Class};
use crate::machine::{Place, Tally};

/// The plugin API version this plugin is written against.
pub const API_VERSION: c_int = 4;

/// Read by QEMU before it calls [`qemu_plugin_install`].
#[no_mangle]
#[used]
pub static qemu_plugin_version: c_int = API_VERSION;

type Id = u64;
#[repr(C)]
struct Tb {
    _opaque: [u8; 0],
}
#[repr(C)]
struct Insn {
    _opaque: [u8; 0],
}
#[repr(C)]
struct HwAddr {
    _opaque: [u8; 0],
}
type MemInfo = u32;

/// `enum qemu_plugin_cb_flags`: `QEMU_PLUGIN_CB_NO_REGS`.
const CB_NO_REGS: c_int = 0;
/// `enum qemu_plugin_mem_rw`: `QEMU_PLUGIN_MEM_RW`.
const MEM_RW: c_int = 3;

type TbTransCb = extern "C" fn(Id, *mut Tb);
type InsnCb = extern "C" fn(u32, *mut c_void);
type MemCb = extern "C" fn(u32, MemInfo, u64, *mut c_void);
type AtExitCb = extern "C" fn(Id, *mut c_void);

/// The plugin API functions used, resolved at install.
struct Api {
    register_tb_trans: extern "C" fn(Id, TbTransCb),
    tb_n_insns: extern "C" fn(*const Tb) -> usize,
    tb_get_insn: extern "C" fn(*const Tb, usize) -> *mut Insn,
    insn_data: extern "C" fn(*const Insn, *mut c_void, usize) -> usize,
    insn_vaddr: extern "C" fn(*const Insn) -> u64,
    register_insn_exec: extern "C" fn(*mut Insn, InsnCb, c_int, *mut c_void),
    register_mem: extern "C" fn(*mut Insn, MemCb, c_int, c_int, *mut c_void),
    get_hwaddr: extern "C" fn(MemInfo, u64) -> *mut HwAddr,
    hwaddr_is_io: extern "C" fn(*const HwAddr) -> bool,
    hwaddr_phys_addr: extern "C" fn(*const HwAddr) -> u64,
    mem_is_store: extern "C" fn(MemInfo) -> bool,
    register_atexit: extern "C" fn(Id, AtExitCb, *mut c_void),
    outs: extern "C" fn(*const c_char),
}

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// `RTLD_DEFAULT` (glibc, musl): search the global symbol scope.
const RTLD_DEFAULT: *mut c_void = core::ptr::null_mut();

/// Looks `name` up in the process and reinterprets it as the function type `F`.
///
/// # Safety
/// `F` must be an `extern "C" fn` type matching the C declaration of `name`.
unsafe fn sym<F: Copy>(name: &CStr) -> Result<F, String> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads.
    let p = unsafe { dlsym(RTLD_DEFAULT, name.as_ptr()) };
    if p.is_null() {
        return Err(format!("QEMU does not provide {}", name.to_string_lossy()));
    }
    debug_assert_eq!(size_of::<F>(), size_of::<*mut c_void>());
    // SAFETY: the caller guarantees F is the function pointer type of the
    // symbol; a non-null data pointer from dlsym is that function's address.
    Ok(unsafe { core::mem::transmute_copy::<*mut c_void, F>(&p) })
}

impl Api {
    fn resolve() -> Result<Api, String> {
        // SAFETY: each type below is the v4 header's declaration of the name.
        unsafe {
            Ok(Api {
                register_tb_trans: sym(c"qemu_plugin_register_vcpu_tb_trans_cb")?,
                tb_n_insns: sym(c"qemu_plugin_tb_n_insns")?,
                tb_get_insn: sym(c"qemu_plugin_tb_get_insn")?,
                insn_data: sym(c"qemu_plugin_insn_data")?,
                insn_vaddr: sym(c"qemu_plugin_insn_vaddr")?,
                register_insn_exec: sym(c"qemu_plugin_register_vcpu_insn_exec_cb")?,
                register_mem: sym(c"qemu_plugin_register_vcpu_mem_cb")?,
                get_hwaddr: sym(c"qemu_plugin_get_hwaddr")?,
                hwaddr_is_io: sym(c"qemu_plugin_hwaddr_is_io")?,
                hwaddr_phys_addr: sym(c"qemu_plugin_hwaddr_phys_addr")?,
                mem_is_store: sym(c"qemu_plugin_mem_is_store")?,
                register_atexit: sym(c"qemu_plugin_register_atexit_cb")?,
                outs: sym(c"qemu_plugin_outs")?,
            })
        }
    }

    fn say(&self, msg: &str) {
        if let Ok(c) = CString::new(msg) {
            (self.outs)(c.as_ptr());
        }
    }
}

static API: OnceLock<Api> = OnceLock::new();
static ARGS: OnceLock<PluginArgs> = OnceLock::new();
static TALLY: Mutex<Option<Tally>> = Mutex::new(None);

fn with_tally(f: impl FnOnce(&mut Tally)) {
    if let Ok(mut g) = TALLY.lock() {
        f(g.get_or_insert_with(Tally::new));
    }
}

/// Userdata of an instruction callback: the place in bits 0..2, the class
/// plus one above (0: no class).
fn pack(place: Place, class: Option<Class>) -> usize {
    let p = match place {
        Place::Switcher => 0,
        Place::Far => 1,
        Place::Elsewhere => 2,
    };
    p | class.map_or(0, |c| (c.index() + 1) << 2)
}

fn unpack(u: usize) -> (Place, Option<Class>) {
    let place = match u & 3 {
        0 => Place::Switcher,
        1 => Place::Far,
        _ => Place::Elsewhere,
    };
    let class = (u >> 2)
        .checked_sub(1)
        .and_then(|i| Class::ALL.get(i).copied());
    (place, class)
}

extern "C" fn on_insn(vcpu: u32, ud: *mut c_void) {
    let (place, class) = unpack(ud as usize);
    with_tally(|t| t.insn(vcpu as usize, place, class));
}

extern "C" fn on_mem(vcpu: u32, info: MemInfo, vaddr: u64, _ud: *mut c_void) {
    let (Some(api), Some(args)) = (API.get(), ARGS.get()) else {
        return;
    };
    let h = (api.get_hwaddr)(info, vaddr);
    if h.is_null() || !(api.hwaddr_is_io)(h) {
        return;
    }
    if (api.hwaddr_phys_addr)(h) & !0xfff != args.apic_page {
        return;
    }
    let store = (api.mem_is_store)(info);
    with_tally(|t| t.apic(vcpu as usize, store));
}

/// Instruments a translation block: every switcher instruction (its class,
/// and its memory accesses for the APIC), and the first instruction of each
/// run of far-side or host instructions (the phase changes).
extern "C" fn on_tb_trans(_id: Id, tb: *mut Tb) {
    let (Some(api), Some(args)) = (API.get(), ARGS.get()) else {
        return;
    };
    let n = (api.tb_n_insns)(tb);
    let mut last = None;
    for i in 0..n {
        let insn = (api.tb_get_insn)(tb, i);
        if insn.is_null() {
            continue;
        }
        let place = args.ranges.place((api.insn_vaddr)(insn));
        if place == Place::Switcher {
            let mut buf = [0u8; 16];
            let len = (api.insn_data)(insn, buf.as_mut_ptr().cast(), buf.len());
            let class = classify(&buf[..len.min(buf.len())], None);
            (api.register_insn_exec)(insn, on_insn, CB_NO_REGS, pack(place, class) as *mut c_void);
            (api.register_mem)(insn, on_mem, CB_NO_REGS, MEM_RW, core::ptr::null_mut());
        } else if last != Some(place) {
            (api.register_insn_exec)(insn, on_insn, CB_NO_REGS, pack(place, None) as *mut c_void);
        }
        last = Some(place);
    }
}

extern "C" fn on_exit(_id: Id, _ud: *mut c_void) {
    let text = TALLY
        .lock()
        .map(|g| crate::report::render(&g.as_ref().map(|t| t.trips.clone()).unwrap_or_default()))
        .unwrap_or_default();
    let Some(api) = API.get() else { return };
    match ARGS.get().and_then(|a| a.out.as_deref()) {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &text) {
                api.say(&format!("costmodel: cannot write {path}: {e}\n"));
            }
        }
        None => api.say(&text),
    }
}

/// Called by QEMU once: checks the arguments, resolves the API and
/// registers the translation and exit callbacks. Returns 0, or -1 with the
/// reason on stderr.
///
/// # Safety
/// QEMU's contract: `argv` holds `argc` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn qemu_plugin_install(
    id: Id,
    _info: *const c_void,
    argc: c_int,
    argv: *const *const c_char,
) -> c_int {
    let mut list = Vec::new();
    for i in 0..usize::try_from(argc).unwrap_or(0) {
        // SAFETY: i < argc, and QEMU passes argc valid pointers.
        let p = unsafe { *argv.add(i) };
        if p.is_null() {
            continue;
        }
        // SAFETY: QEMU's arguments are NUL-terminated strings that outlive the plugin.
        list.push(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
    }
    let result = args::parse(list.iter().map(String::as_str)).and_then(|a| {
        let api = Api::resolve()?;
        Ok((a, api))
    });
    let (a, api) = match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("costmodel: {e}");
            return -1;
        }
    };
    let _ = ARGS.set(a);
    let api = API.get_or_init(|| api);
    (api.register_tb_trans)(id, on_tb_trans);
    (api.register_atexit)(id, on_exit, core::ptr::null_mut());
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userdata_packs_place_and_class() {
        for place in [Place::Switcher, Place::Far, Place::Elsewhere] {
            assert_eq!(unpack(pack(place, None)), (place, None));
            for c in Class::ALL {
                assert_eq!(unpack(pack(place, Some(c))), (place, Some(c)));
            }
        }
    }
}
