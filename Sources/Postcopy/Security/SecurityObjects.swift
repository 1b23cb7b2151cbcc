import Synchronization

/// The process's user-created objects, as QEMU's `/objects` container holds them: TLS
/// credentials and authorization lists, added with `--object`, QMP `object-add` or HMP
/// `object_add`, named by the `tls-creds` and `tls-authz` parameters, removed with `object-del`.
/// One registry per process, as in QEMU: every monitor and migration sees the same objects.
public final class SecurityObjects: Sendable {
    public static let shared = SecurityObjects()

    enum Object {
        case tlsCredentials(TLSCredentials)
        case authz(AuthzSimple)
    }

    private let objects = Mutex<[String: Object]>([:])

    public init() {}

    public static let types = ["tls-creds-psk", "tls-creds-x509", "authz-simple"]

    /// Adds an object of `type` (a QOM type name) with its properties (QEMU's names, values as
    /// text: "on"/"off" for booleans). The files it names are read now.
    public func add(type: String, id: String, properties: [String: String]) throws {
        guard !id.isEmpty else { throw MigrationError.invalidSetting("Parameter 'id' is missing") }
        var properties = properties
        func take(_ name: String) -> String? { properties.removeValue(forKey: name) }
        func require(_ name: String) throws -> String {
            guard let value = take(name) else { throw MigrationError.invalidSetting("\(type) '\(id)': property '\(name)' is missing") }
            return value
        }
        func onOff(_ name: String, default value: Bool) throws -> Bool {
            switch take(name) {
            case nil: return value
            case "on", "yes", "true": return true
            case "off", "no", "false": return false
            case let other?: throw MigrationError.invalidSetting("\(type) '\(id)': property '\(name)' expects on or off, not '\(other)'")
            }
        }
        let object: Object
        switch type {
        case "tls-creds-psk", "tls-creds-x509":
            let kind = TLSCredentials.Kind(rawValue: type)!
            let endpointName = take("endpoint") ?? "client"   // QEMU's default endpoint
            guard let endpoint = TLSCredentials.Endpoint(rawValue: endpointName) else {
                throw MigrationError.invalidSetting("\(type) '\(id)': endpoint must be server or client, not '\(endpointName)'")
            }
            let directory = try require("dir")
            let verifyPeer = kind == .x509 ? try onOff("verify-peer", default: true) : false
            let username = kind == .psk ? take("username") : nil
            try refuseLeftovers(properties, type: type, id: id)
            object = .tlsCredentials(try TLSCredentials(id: id, kind: kind, endpoint: endpoint, directory: directory,
                                                        verifyPeer: verifyPeer, username: username))
        case "authz-simple":
            let identity = try require("identity")
            try refuseLeftovers(properties, type: type, id: id)
            object = .authz(AuthzSimple(id: id, identity: identity))
        default:
            throw MigrationError.invalidSetting("invalid object type: \(type) (known: \(Self.types.joined(separator: ", ")))")
        }
        try objects.withLock { objects in
            guard objects[id] == nil else {
                throw MigrationError.invalidSetting("attempt to add duplicate property '\(id)' to object (type 'container')")
            }
            objects[id] = object
        }
    }

    /// Adds an object given as QEMU's `-object` / HMP `object_add` text:
    /// `tls-creds-psk,id=tls0,endpoint=server,dir=/path` (a comma inside a value is written `,,`).
    public func add(commandLine: String) throws {
        var fields = Self.splitOptions(commandLine)
        guard !fields.isEmpty, !fields[0].contains("=") else {
            throw MigrationError.invalidSetting("'\(commandLine)': expected TYPE,id=ID[,PROPERTY=VALUE...]")
        }
        let type = fields.removeFirst()
        var properties: [String: String] = [:]
        for field in fields {
            guard let equals = field.firstIndex(of: "=") else {
                throw MigrationError.invalidSetting("'\(commandLine)': '\(field)' is not PROPERTY=VALUE")
            }
            properties[String(field[..<equals])] = String(field[field.index(after: equals)...])
        }
        let id = properties.removeValue(forKey: "id") ?? ""
        try add(type: type, id: id, properties: properties)
    }

    public func delete(id: String) throws {
        try objects.withLock { objects in
            guard objects.removeValue(forKey: id) != nil else { throw MigrationError.invalidSetting("object '\(id)' not found") }
        }
    }

    /// The credentials `tls-creds` names.
    public func tlsCredentials(_ id: String) throws -> TLSCredentials {
        guard case .tlsCredentials(let credentials)? = objects.withLock({ $0[id] }) else {
            throw MigrationError.invalidSetting("No TLS credentials with id '\(id)' (add them with object-add tls-creds-psk or tls-creds-x509)")
        }
        return credentials
    }

    /// The authorization list `tls-authz` names.
    func authz(_ id: String) throws -> AuthzSimple {
        guard case .authz(let authz)? = objects.withLock({ $0[id] }) else {
            throw MigrationError.invalidSetting("No authorization object with id '\(id)' (add one with object-add authz-simple)")
        }
        return authz
    }

    private func refuseLeftovers(_ properties: [String: String], type: String, id: String) throws {
        if let name = properties.keys.sorted().first {
            throw MigrationError.invalidSetting("\(type) '\(id)': unknown property '\(name)'")
        }
    }

    /// QEMU's option syntax: fields split at single commas; `,,` is a literal comma.
    static func splitOptions(_ text: String) -> [String] {
        var fields: [String] = []
        var current = ""
        var characters = text.makeIterator()
        var pending = characters.next()
        while let c = pending {
            pending = characters.next()
            if c == "," {
                if pending == "," {
                    current.append(",")
                    pending = characters.next()
                } else {
                    fields.append(current)
                    current = ""
                }
            } else {
                current.append(c)
            }
        }
        fields.append(current)
        return fields
    }
}

/// QEMU's `authz-simple`: the one identity allowed in, an x509 client's distinguished name
/// (RFC 4514 order, as QEMU prints it: `CN=client,O=Example,C=GB`) or a PSK username.
public struct AuthzSimple: Sendable, Equatable {
    public let id: String
    public let identity: String
}
