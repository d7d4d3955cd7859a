//! The slots of one kind of authority, and the state changes both kinds share: which key
//! slot a successor takes, installing a prepared authority, activating it, pruning expired
//! ones and retiring those whose key is gone. Each function changes the in-memory state
//! only; the caller writes the journal and the bundle.

use std::sync::Arc;

use tessera_store::SlotStatus;

use crate::authority::{AuthorityKind, BundleChange, JournalEntry, State};
use crate::error::CaError;
use crate::policy::{Step, is_prunable, next_step};

/// The key manager slot a successor takes: the one the active authority does not use.
pub(crate) fn next_key_slot<K: AuthorityKind>(s: &State) -> &'static str {
    let active = K::slots(s).active.as_ref().map(|a| K::entry(a).key_slot());
    let [a, b] = K::KEY_SLOTS;
    if active == Some(a) { b } else { a }
}

/// The rotation policy's step for this kind at `now`.
pub(crate) fn step<K: AuthorityKind>(s: &State, now: i64) -> Step {
    let slots = K::slots(s);
    next_step(now, slots.active.as_ref().map(|a| K::entry(a).lifetime()), slots.prepared.is_some())
}

/// The bundle change installing a new prepared authority makes: the items of a prepared
/// authority it replaces (which never signed anything) leave, unless another authority or
/// the newcomer still holds them; `new_items` join.
pub(crate) fn preparing_change<K: AuthorityKind>(
    s: &State,
    new_items: Vec<crate::authority::BundleItem>,
) -> BundleChange {
    let journal = K::journal(&s.journal);
    let mut change = BundleChange::retiring(
        journal.iter().filter(|e| e.status() == SlotStatus::Prepared),
        journal.iter().filter(|e| e.status() != SlotStatus::Prepared),
        &new_items,
    );
    change.add = new_items;
    change
}

/// Makes `authority` the prepared one: the journal drops any earlier prepared entry and
/// records this one.
pub(crate) fn install_prepared<K: AuthorityKind>(s: &mut State, authority: Arc<K::Authority>) {
    let (journal, slots) = K::parts(s);
    journal.retain(|e| e.status() != SlotStatus::Prepared);
    journal.push(K::entry(&authority).clone());
    // The two key slots alternate: the newcomer's is the previous authority's.
    if slots.previous.as_ref().is_some_and(|p| K::entry(p).key_slot() == K::entry(&authority).key_slot()) {
        slots.previous = None;
    }
    slots.prepared = Some(authority);
}

/// Forgets the previous authority when its key is in `key_slot` (about to get a new key).
pub(crate) fn forget_previous_in<K: AuthorityKind>(s: &mut State, key_slot: &str) {
    let (_, slots) = K::parts(s);
    if slots.previous.as_ref().is_some_and(|p| K::entry(p).key_slot() == key_slot) {
        slots.previous = None;
    }
}

/// Activates the prepared authority; the active one becomes old. `expected`, when given and
/// not empty, must name the prepared authority.
pub(crate) fn activate<K: AuthorityKind>(s: &mut State, expected: Option<&str>) -> Result<(), CaError> {
    let (journal, slots) = K::parts(s);
    let prepared = slots.prepared.as_ref().ok_or(CaError::NothingPrepared(K::NAME))?;
    let prepared_id = K::entry(prepared).id().to_owned();
    if let Some(asked) = expected.filter(|w| !w.is_empty())
        && asked != prepared_id
    {
        return Err(CaError::NotThePrepared { asked: asked.to_owned(), prepared: prepared_id });
    }
    for e in journal.iter_mut() {
        if e.status() == SlotStatus::Active {
            e.set_status(SlotStatus::Old);
        }
        if e.id() == prepared_id {
            e.set_status(SlotStatus::Active);
        }
    }
    // The journal is the record of status; the authority's own copy of its entry keeps the
    // status it was made with.
    slots.previous = std::mem::replace(&mut slots.active, slots.prepared.take());
    Ok(())
}

/// Drops old, expired entries from the journal; returns the bundle change that goes with it
/// and how many were dropped.
pub(crate) fn prune<K: AuthorityKind>(s: &mut State, now: i64) -> (BundleChange, usize) {
    let (journal, _) = K::parts(s);
    let (gone, remaining): (Vec<_>, Vec<_>) =
        journal.drain(..).partition(|e| is_prunable(now, e.status(), e.lifetime().not_after));
    let change = BundleChange::retiring(gone.iter(), remaining.iter(), &[]);
    *journal = remaining;
    (change, gone.len())
}

/// Marks every entry that is neither old nor held by a slot as old (its key is gone from the
/// key manager, so it can never sign again).
pub(crate) fn retire_unusable<K: AuthorityKind>(s: &mut State) {
    let (journal, slots) = K::parts(s);
    let usable: Vec<String> =
        [&slots.active, &slots.prepared].into_iter().flatten().map(|a| K::entry(a).id().to_owned()).collect();
    for e in journal.iter_mut() {
        if e.status() != SlotStatus::Old && !usable.iter().any(|u| u == e.id()) {
            e.set_status(SlotStatus::Old);
        }
    }
}

/// Puts a restored authority back in the slot its journal status names.
pub(crate) fn restore<K: AuthorityKind>(s: &mut State, status: SlotStatus, authority: Arc<K::Authority>) {
    let (_, slots) = K::parts(s);
    match status {
        SlotStatus::Active => slots.active = Some(authority),
        SlotStatus::Prepared => slots.prepared = Some(authority),
        SlotStatus::Old => {}
    }
}
