//! Local vector table entry fields (SDM Vol. 3A, APIC chapter, "Local Vector Table").
//!
//! The constants are raw bit masks so machine-code templates can use them as
//! immediates; [`DeliveryMode`] and the helper functions give the typed view.

/// Vector number (bits 7:0).
pub const VECTOR_MASK: u32 = 0xff;
/// Delivery mode field (bits 10:8).
pub const MODE_MASK: u32 = 0x700;
/// Delivery mode: fixed vector.
pub const MODE_FIXED: u32 = 0;
/// Delivery mode: SMI.
pub const MODE_SMI: u32 = 0x200;
/// Delivery mode: NMI.
pub const MODE_NMI: u32 = 0x400;
/// Delivery mode: INIT.
pub const MODE_INIT: u32 = 0x500;
/// Delivery mode: ExtINT (8259-compatible external interrupt).
pub const MODE_EXTINT: u32 = 0x700;
/// Delivery status (bit 12, read-only): an interrupt is pending delivery.
pub const DELIVERY_PENDING: u32 = 1 << 12;
/// Input pin polarity (bit 13): set for active low.
pub const POLARITY_LOW: u32 = 1 << 13;
/// Remote IRR (bit 14, read-only).
pub const REMOTE_IRR: u32 = 1 << 14;
/// Trigger mode (bit 15): set for level triggered.
pub const LEVEL_TRIGGER: u32 = 1 << 15;
/// Mask (bit 16): set to inhibit delivery.
pub const MASKED: u32 = 1 << 16;

const MODE_SHIFT: u32 = 8;

/// An LVT delivery-mode encoding (bits 10:8).
///
/// Encodings 1, 3 and 6 are reserved for LVT entries; [`delivery_mode`]
/// returns `None` for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DeliveryMode {
    /// `000`: deliver the vector in bits 7:0.
    Fixed = 0,
    /// `010`: deliver an SMI.
    Smi = 2,
    /// `100`: deliver an NMI (the vector is ignored).
    Nmi = 4,
    /// `101`: deliver an INIT.
    Init = 5,
    /// `111`: ExtINT, the vector comes from an external 8259.
    ExtInt = 7,
}

impl DeliveryMode {
    /// Every valid LVT delivery mode.
    pub const ALL: [DeliveryMode; 5] = [
        DeliveryMode::Fixed,
        DeliveryMode::Smi,
        DeliveryMode::Nmi,
        DeliveryMode::Init,
        DeliveryMode::ExtInt,
    ];

    /// This mode already shifted into the LVT's mode field (one of the `MODE_*` constants).
    pub const fn bits(self) -> u32 {
        (self as u32) << MODE_SHIFT
    }

    /// The mode encoded in an LVT value, or `None` for a reserved encoding.
    pub const fn from_lvt(value: u32) -> Option<Self> {
        match (value & MODE_MASK) >> MODE_SHIFT {
            0 => Some(DeliveryMode::Fixed),
            2 => Some(DeliveryMode::Smi),
            4 => Some(DeliveryMode::Nmi),
            5 => Some(DeliveryMode::Init),
            7 => Some(DeliveryMode::ExtInt),
            _ => None,
        }
    }
}

/// The delivery mode of an LVT value, or `None` for a reserved encoding.
pub const fn delivery_mode(value: u32) -> Option<DeliveryMode> {
    DeliveryMode::from_lvt(value)
}

/// `value` with its delivery-mode field replaced by `mode`; other bits kept.
pub const fn with_delivery_mode(value: u32, mode: DeliveryMode) -> u32 {
    (value & !MODE_MASK) | mode.bits()
}

/// The vector field (bits 7:0).
pub const fn vector(value: u32) -> u8 {
    (value & VECTOR_MASK) as u8
}

/// Whether the mask bit is set.
pub const fn is_masked(value: u32) -> bool {
    value & MASKED != 0
}

/// Whether this LVT would deliver an NMI now: mask clear and mode NMI,
/// i.e. `(value & (MASKED | MODE_MASK)) == MODE_NMI`. This is the test the
/// switcher applies to each candidate LVT.
pub const fn is_unmasked_nmi(value: u32) -> bool {
    value & (MASKED | MODE_MASK) == MODE_NMI
}

const _: () = {
    assert!(DeliveryMode::Fixed.bits() == MODE_FIXED);
    assert!(DeliveryMode::Smi.bits() == MODE_SMI);
    assert!(DeliveryMode::Nmi.bits() == MODE_NMI);
    assert!(DeliveryMode::Init.bits() == MODE_INIT);
    assert!(DeliveryMode::ExtInt.bits() == MODE_EXTINT);
    assert!(MASKED == 0x1_0000);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_round_trips_and_reserved_encodings() {
        for mode in DeliveryMode::ALL {
            assert_eq!(delivery_mode(mode.bits() | 0x1_e0ff), Some(mode));
            assert_eq!(
                delivery_mode(with_delivery_mode(0xffff_ffff, mode)),
                Some(mode)
            );
        }
        for reserved in [0x100, 0x300, 0x600] {
            assert_eq!(delivery_mode(reserved), None);
        }
        assert_eq!(with_delivery_mode(0x1_a7ff, DeliveryMode::Fixed), 0x1_a0ff);
    }

    #[test]
    fn mask_and_vector_helpers() {
        assert!(is_masked(MASKED));
        assert!(!is_masked(!MASKED));
        assert_eq!(vector(0x1_04ee), 0xee);
    }

    #[test]
    fn unmasked_nmi_only_for_mode_nmi_with_mask_clear() {
        let others = POLARITY_LOW | LEVEL_TRIGGER | REMOTE_IRR | DELIVERY_PENDING | 0xff;
        for mode in DeliveryMode::ALL {
            for extra in [0, others, 0xfffe_0000] {
                let v = mode.bits() | extra;
                assert_eq!(is_unmasked_nmi(v), mode == DeliveryMode::Nmi, "{v:#x}");
                assert!(!is_unmasked_nmi(v | MASKED), "{v:#x}");
            }
        }
        // Reserved encodings that share bit 10 with NMI are not NMI.
        assert!(!is_unmasked_nmi(0x600));
        assert!(!is_unmasked_nmi(0x500));
    }
}
