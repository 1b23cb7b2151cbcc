import Glibc
import Postcopy

/// Why a benchmark run has no figures: its loop failed, or it measured the wrong thing.
enum BenchError: Error, CustomStringConvertible {
    case wrongContents(side: String, method: String)
    case floor(String, errno: Int32)

    var description: String {
        switch self {
        case let .wrongContents(side, method):
            "\(side) \(method) round trip: the touched pages did not hold what the handler placed"
        case let .floor(what, errno):
            "C floor \(what): \(SystemError(what, errno: errno).name) (\(String(cString: strerror(errno))))"
        }
    }
}
