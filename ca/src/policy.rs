//! The rotation policy, as pure functions of the time and the slots: nothing here reads a
//! clock, a store or a key.
//!
//! Each kind of authority (X.509 CA, JWT key) has an active slot and a prepared slot. A new
//! authority is prepared at half of the active one's life (and joins the bundle then, so
//! every peer trusts it before it signs anything), becomes active at five sixths, and the
//! old one stays in the bundle until it expires, when it is pruned. The thresholds are taken
//! from the authority's real lifetime, so an upstream that shortens a CA's life moves them
//! with it.

use tessera_store::SlotStatus;

/// An authority's validity, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// When it was made.
    pub issued_at: i64,
    /// When it expires.
    pub not_after: i64,
}

impl Lifetime {
    /// When its successor is prepared: half of its life.
    pub fn prepare_at(&self) -> i64 {
        self.fraction(1, 2)
    }

    /// When its successor becomes active: five sixths of its life.
    pub fn activate_at(&self) -> i64 {
        self.fraction(5, 6)
    }

    fn fraction(&self, num: i128, den: i128) -> i64 {
        let life = i128::from(self.not_after) - i128::from(self.issued_at);
        let at = i128::from(self.issued_at) + life * num / den;
        i64::try_from(at).unwrap_or(if at < 0 { i64::MIN } else { i64::MAX })
    }
}

/// What one kind of authority needs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Nothing,
    /// Prepare a successor.
    Prepare,
    /// Activate the prepared successor.
    Activate,
    /// There is no usable active authority and no successor: make one and activate it.
    PrepareAndActivate,
}

/// The step for one kind of authority at `now`, given the active authority's lifetime (none
/// when there is no active one) and whether a successor is prepared.
///
/// A clock that jumps forward past the active authority's end replaces it at once; a clock
/// that jumps backwards only delays the next step.
pub fn next_step(now: i64, active: Option<Lifetime>, prepared: bool) -> Step {
    match active {
        Some(a) if a.not_after > now => {
            if !prepared && now >= a.prepare_at() {
                Step::Prepare
            } else if prepared && now >= a.activate_at() {
                Step::Activate
            } else {
                Step::Nothing
            }
        }
        // None active, or the active one has expired.
        _ if prepared => Step::Activate,
        _ => Step::PrepareAndActivate,
    }
}

/// Whether a journal entry is pruned at `now`: old and expired. Active and prepared
/// authorities are never pruned, even when expired (rotation replaces them first).
pub fn is_prunable(now: i64, status: SlotStatus, not_after: i64) -> bool {
    status == SlotStatus::Old && not_after <= now
}

/// Why an authority cannot be tainted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintRefusal {
    /// Only an old authority can be tainted: its successor must be active first, or the CA
    /// would be left signing with a key its own agents distrust.
    NotOld(SlotStatus),
    /// It is tainted already.
    AlreadyTainted,
}

/// Whether an authority in `status` may be tainted.
pub fn may_taint(status: SlotStatus, tainted: bool) -> Result<(), TaintRefusal> {
    if status != SlotStatus::Old {
        return Err(TaintRefusal::NotOld(status));
    }
    if tainted {
        return Err(TaintRefusal::AlreadyTainted);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000;
    /// A 60-hour CA: prepare at 30 h, activate at 50 h.
    const LIFE: Lifetime = Lifetime { issued_at: T0, not_after: T0 + 60 * 3600 };

    #[test]
    fn thresholds_are_half_and_five_sixths_of_the_real_life() {
        assert_eq!(LIFE.prepare_at(), T0 + 30 * 3600);
        assert_eq!(LIFE.activate_at(), T0 + 50 * 3600);
        // An odd life rounds towards the start, as integer seconds.
        let odd = Lifetime { issued_at: 0, not_after: 7 };
        assert_eq!((odd.prepare_at(), odd.activate_at()), (3, 5));
    }

    #[test]
    fn a_fresh_ca_makes_and_activates_its_first_authority() {
        assert_eq!(next_step(T0, None, false), Step::PrepareAndActivate);
        // A prepared one left by a crash between prepare and activate is activated.
        assert_eq!(next_step(T0, None, true), Step::Activate);
    }

    #[test]
    fn prepare_at_half_life_and_not_before() {
        assert_eq!(next_step(LIFE.prepare_at() - 1, Some(LIFE), false), Step::Nothing);
        assert_eq!(next_step(LIFE.prepare_at(), Some(LIFE), false), Step::Prepare);
        // Once prepared, nothing until five sixths.
        assert_eq!(next_step(LIFE.prepare_at(), Some(LIFE), true), Step::Nothing);
        assert_eq!(next_step(LIFE.activate_at() - 1, Some(LIFE), true), Step::Nothing);
    }

    #[test]
    fn activate_at_five_sixths_only_when_prepared() {
        assert_eq!(next_step(LIFE.activate_at(), Some(LIFE), true), Step::Activate);
        // Not prepared yet (the upstream was down at half life): prepare first.
        assert_eq!(next_step(LIFE.activate_at(), Some(LIFE), false), Step::Prepare);
    }

    #[test]
    fn an_expired_active_authority_is_replaced_at_once() {
        assert_eq!(next_step(LIFE.not_after, Some(LIFE), false), Step::PrepareAndActivate);
        assert_eq!(next_step(LIFE.not_after, Some(LIFE), true), Step::Activate);
    }

    #[test]
    fn clock_jumps() {
        // Forward by days: straight to replacement.
        assert_eq!(next_step(LIFE.not_after + 10 * 86_400, Some(LIFE), false), Step::PrepareAndActivate);
        // Backwards, before the authority was even issued: nothing (no churn).
        assert_eq!(next_step(T0 - 86_400, Some(LIFE), false), Step::Nothing);
        assert_eq!(next_step(T0 - 86_400, Some(LIFE), true), Step::Nothing);
    }

    #[test]
    fn an_upstream_shortened_lifetime_moves_the_thresholds() {
        // Asked for 60 h, the upstream gave 12 h: prepare at 6 h, activate at 10 h.
        let short = Lifetime { issued_at: T0, not_after: T0 + 12 * 3600 };
        assert_eq!(next_step(T0 + 6 * 3600 - 1, Some(short), false), Step::Nothing);
        assert_eq!(next_step(T0 + 6 * 3600, Some(short), false), Step::Prepare);
        assert_eq!(next_step(T0 + 10 * 3600, Some(short), true), Step::Activate);
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let huge = Lifetime { issued_at: i64::MIN / 2, not_after: i64::MAX };
        assert!(huge.prepare_at() > huge.issued_at && huge.activate_at() > huge.prepare_at());
        assert_eq!(next_step(0, Some(huge), false), Step::Nothing);
    }

    #[test]
    fn prune_only_expired_old_authorities() {
        assert!(is_prunable(T0, SlotStatus::Old, T0));
        assert!(!is_prunable(T0, SlotStatus::Old, T0 + 1));
        assert!(!is_prunable(T0, SlotStatus::Active, T0 - 1));
        assert!(!is_prunable(T0, SlotStatus::Prepared, T0 - 1));
    }

    #[test]
    fn taint_only_old_untainted_authorities() {
        assert_eq!(may_taint(SlotStatus::Old, false), Ok(()));
        assert_eq!(may_taint(SlotStatus::Old, true), Err(TaintRefusal::AlreadyTainted));
        assert_eq!(may_taint(SlotStatus::Active, false), Err(TaintRefusal::NotOld(SlotStatus::Active)));
        assert_eq!(may_taint(SlotStatus::Prepared, false), Err(TaintRefusal::NotOld(SlotStatus::Prepared)));
    }
}
