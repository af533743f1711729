//! Newtypes that keep the views of the switcher code apart.
//!
//! One physical block of switcher code is seen through several views: the
//! Rust buffer the relocator patches (R3), the host ring-0 address (HC), the
//! identity address used while paging modes change (ID = physical), and the
//! hypervisor-context address (RC). A value of one view never becomes another
//! without a named conversion.

use core::fmt;

use serde::Serialize;

macro_rules! addr_type {
    ($(#[$m:meta])* $name:ident($inner:ty), $width:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw address.
            pub const fn get(self) -> $inner {
                self.0
            }

            /// `self + off`, or `None` on overflow.
            pub fn checked_add(self, off: u32) -> Option<Self> {
                self.0.checked_add(<$inner>::from(off)).map(Self)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#0", $width, "x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!("{:#0", $width, "x}"), self.0)
            }
        }
    };
}

addr_type!(
    /// A host ring-0 virtual address (64 bits wide so AMD64 hosts fit).
    HcAddr(u64),
    18
);
addr_type!(
    /// A hypervisor-context (raw-mode context) virtual address; always 32-bit.
    RcAddr(u32),
    10
);
addr_type!(
    /// A physical address; for switcher code it is also the identity-mapped
    /// virtual address used while paging is being switched.
    PhysAddr(u64),
    18
);

impl PhysAddr {
    /// The identity-view address as a u32, if the address is below 4 GiB.
    pub fn as_id32(self) -> Option<u32> {
        u32::try_from(self.0).ok()
    }
}

/// A byte offset from the start of a switcher's code (`offSrc`, targets, entry points).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug, Serialize)]
#[serde(transparent)]
pub struct CodeOffset(pub u32);

impl fmt::Display for CodeOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "+{:#06x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_and_overflow() {
        assert_eq!(RcAddr(0xa000_0000).to_string(), "0xa0000000");
        assert_eq!(
            format!("{:?}", HcAddr(0xc040_0000)),
            "HcAddr(0x00000000c0400000)"
        );
        assert_eq!(RcAddr(u32::MAX).checked_add(1), None);
        assert_eq!(PhysAddr(0x1_0000_0000).as_id32(), None);
        assert_eq!(PhysAddr(0x40_0000).as_id32(), Some(0x40_0000));
    }
}
