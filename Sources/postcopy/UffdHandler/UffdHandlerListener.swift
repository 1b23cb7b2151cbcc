import Glibc
import Postcopy

/// The handler's listening socket. Whoever connects can have its memory filled from the
/// snapshot, so the socket is the owner's alone (mode 0600) and a connection from another user
/// (not root) is refused: Firecracker's documentation asks that only the VMM and the handler
/// can reach it.
struct UffdHandlerListener: ~Copyable {
    let path: String
    let socket: Descriptor

    /// Listens at `path`, replacing a socket left there by a handler that died.
    init(path: String) throws {
        self.path = path
        socket = try Descriptor.ownerOnlyUnixListener(at: path).takeSocket()
    }

    /// The connecting process's pid when it may be served; nil (logged) when not.
    func admits(_ connection: borrowing Descriptor) -> pid_t? {
        let peer: (pid: pid_t, uid: uid_t)
        do {
            peer = try connection.peerCredentials()
        } catch {
            uffdHandlerLog.error("connection on \(path) refused: \(error)")
            return nil
        }
        let owner = geteuid()
        guard peer.uid == owner || peer.uid == 0 else {
            uffdHandlerLog.error("connection on \(path) refused: pid \(peer.pid) runs as uid \(peer.uid); only uid \(owner) and root may use this handler")
            return nil
        }
        return peer.pid
    }

    deinit { unlink(path) }
}
