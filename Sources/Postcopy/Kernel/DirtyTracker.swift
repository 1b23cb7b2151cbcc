/// How the source learns which guest pages were written since it last looked, so that precopy
/// sends them again. The library's `PagemapDirtyTracker` serves any host with no hypervisor
/// help; a host whose hypervisor logs the guest's writes itself (KVM's dirty log) can supply
/// its own through `SourceHooks.makeDirtyTracker(for:)`. A cheaper sync shortens the downtime,
/// since the final one runs with the vCPUs paused.
///
/// Threads: one thread makes it, syncs it and stops it (a migration's control thread, or a
/// snapshot save's).
public protocol DirtyTracker: AnyObject {
    /// The method's name, as `info migrate` shows it (`x-dirty-tracking`).
    var methodName: String { get }

    /// True when reading what was written and re-arming are two steps, so that a write
    /// between them would be lost: the source then pauses the vCPUs around every sync.
    var writersMustHoldStill: Bool { get }

    /// Calls `body(firstPage, pageCount)` for every range of pages written since the last sync
    /// (or since the tracker was made), each page once, and re-arms tracking for them; returns
    /// the number of pages reported. A write after `sync` returns is reported by the next one;
    /// one during it, now or next time (the source reads a page only after the sync that
    /// reported it). With `rearm: false` (the final sync: the vCPUs are paused for good) the
    /// pages need only be read.
    @discardableResult
    func sync(rearm: Bool, _ body: (_ firstPage: Int, _ pageCount: Int) -> Void) throws -> Int

    /// Ends tracking; later syncs report nothing. The source calls it when its migration's
    /// control thread is done: after the switch (off the downtime, once a postcopy has pushed
    /// every page), or when the migration failed before it (the guest runs on here).
    func stop()
}

extension DirtyTracker {
    /// A sync during precopy: report, and re-arm for the next pass.
    @discardableResult
    public func sync(_ body: (_ firstPage: Int, _ pageCount: Int) -> Void) throws -> Int {
        try sync(rearm: true, body)
    }
}
