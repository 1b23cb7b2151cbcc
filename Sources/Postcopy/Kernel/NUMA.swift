import CPostcopy

/// NUMA policy as the kernel reports it (raw mbind/get_mempolicy/move_pages; no libnuma).
public enum NUMA {
    /// Whether the kernel supports NUMA policy calls at all.
    public static var isAvailable: Bool { cpc_numa_available() >= 0 }
    /// MPOL_BIND as get_mempolicy reports it.
    public static let bindMode: Int32 = 2
    /// The node a (present) page sits on now, or nil when the kernel will not say.
    public static func node(ofPage address: UnsafeRawPointer) -> Int? {
        let node = cpc_node_of_page(UnsafeMutableRawPointer(mutating: address))
        return node >= 0 ? Int(node) : nil
    }
}
