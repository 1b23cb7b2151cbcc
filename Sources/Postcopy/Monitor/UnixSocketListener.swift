import CPostcopy
import Glibc
import Synchronization

/// A listening unix socket that serves every connection on a thread of its own, until `stop()`.
/// The QMP and HMP servers are this plus their conversation. Monitor traffic is a few commands
/// a second, so a thread per connection is the simplest thing that lets a slow command on one
/// connection leave the others alone.
final class UnixSocketListener: Sendable {
    let path: String
    /// The listening socket; `stop()` takes it out and closes it once the accept loop has ended.
    private let listening: Mutex<Descriptor?>
    /// The socket file's identity, so `stop()` removes this socket and not a later one at the path.
    private let inode: (device: UInt, inode: UInt)
    private let state = Guarded(State())

    private struct State {
        var stopped = false
        var connections: [ObjectIdentifier: MonitorSocket] = [:]
        /// Threads started and not yet finished: the accept loop and one per connection.
        var running = 0
        /// Their kernel tids, so `stop()` called from a connection (a `quit`) does not wait for itself.
        var threadIDs: Set<Int32> = []
    }

    /// Listens at `path`, replacing a stale socket left there by a process that died, and starts
    /// accepting. `serve` runs once per connection on that connection's thread; when it returns,
    /// the connection is closed. A connection from a process of another user (not root) gets
    /// `refusal(why)` and is closed, unserved.
    init(path: String, name: String, refusal: @escaping @Sendable (String) -> String = { $0 + "\n" },
         serve: @escaping @Sendable (MonitorSocket) -> Void) throws {
        self.path = path
        let bound = try Descriptor.ownerOnlyUnixListener(at: path)
        inode = bound.inode
        listening = Mutex(bound.takeSocket())
        state.update { $0.running += 1 }
        startDetachedThread("\(name) accept") { [self] in
            self.acceptLoop(name: name, refusal: refusal, serve: serve)
        }
    }

    /// Whether a connection may talk to the monitor: the monitor drives guest memory and the
    /// migration, so only the host's own user and root may. Refused ones are told why, logged
    /// and closed.
    private func admits(_ connection: MonitorSocket, name: String, refusal: (String) -> String) -> Bool {
        let owner = geteuid()
        let peer: (pid: pid_t, uid: uid_t)
        do {
            peer = try connection.peerCredentials()
        } catch {
            Log.monitor.warning("\(name) connection on \(path) refused: \(error)")
            return false
        }
        if peer.uid == owner || peer.uid == 0 { return true }
        Log.monitor.warning("\(name) connection on \(path) refused: pid \(peer.pid) runs as uid \(peer.uid); only uid \(owner) and root may use this monitor")
        let why = "Permission denied: this monitor belongs to uid \(owner); only that user and root may use it, not uid \(peer.uid)"
        do {
            try connection.send(refusal(why))
        } catch {
            Log.monitor.debug("refused \(name) client went away: \(error)")
        }
        return false
    }

    private func acceptLoop(name: String, refusal: (String) -> String, serve: @escaping @Sendable (MonitorSocket) -> Void) {
        let me = currentThreadID()
        state.update { _ = $0.threadIDs.insert(me) }
        defer { state.update { $0.threadIDs.remove(me); $0.running -= 1 } }
        // The number, not the owned socket, is used below (accept must not hold the lock); it
        // stays valid because stop() closes the socket only after this loop has ended.
        let number = listening.withLock { listening -> Int32? in
            switch listening {
            case .some(let socket): socket.rawValue
            case .none: nil
            }
        }
        guard let socket = number else { return }
        while true {
            let accepted: Descriptor
            do throws(SystemError) {
                accepted = Descriptor(adopting: try syscallValue("accept(\(path))") { cpc_accept_cloexec(socket) })
            } catch {
                if state.read(\.stopped) { return }
                switch error.errno {
                case ECONNABORTED: continue
                case EMFILE, ENFILE, ENOBUFS, ENOMEM: usleep(100_000)  // out of resources: retry later, do not spin
                default:
                    Log.monitor.error("\(error); \(path) accepts no more connections")
                    return
                }
                continue
            }
            let connection = MonitorSocket(accepted)
            guard admits(connection, name: name, refusal: refusal) else { continue }
            let admitted = state.update { s -> Bool in
                guard !s.stopped else { return false }
                s.connections[ObjectIdentifier(connection)] = connection
                s.running += 1
                return true
            }
            guard admitted else { return }
            startDetachedThread("\(name) connection") { [self] in
                let tid = currentThreadID()
                state.update { _ = $0.threadIDs.insert(tid) }
                serve(connection)
                state.update {
                    $0.connections[ObjectIdentifier(connection)] = nil
                    $0.threadIDs.remove(tid)
                    $0.running -= 1
                }
            }
        }
    }

    /// Stops accepting, ends every open conversation, waits for their threads (a command in
    /// progress finishes first) and removes the socket file. Safe to call from a connection.
    func stop() {
        let first = state.update { s -> Bool in
            defer { s.stopped = true }
            // Under the lock: a connection leaves the table before its descriptor closes.
            for connection in s.connections.values { connection.shutdown() }
            return !s.stopped
        }
        if first {
            listening.withLock { listening in
                switch listening {
                case .some(let socket): socket.shutdown(what: path)  // wakes accept(2) on Linux
                case .none: break
                }
            }
        }
        let me = currentThreadID()
        state.wait { $0.running == ($0.threadIDs.contains(me) ? 1 : 0) }
        guard first else { return }
        do {
            try listening.withLock { $0.take() }?.close()
        } catch {
            Log.monitor.warning("\(error)")
        }
        var current = stat()
        if lstat(path, &current) == 0, UInt(current.st_dev) == inode.device, UInt(current.st_ino) == inode.inode,
           unlink(path) != 0 {
            Log.monitor.warning("\(SystemError("unlink \(path)")): the socket file stays behind")
        }
    }
}
