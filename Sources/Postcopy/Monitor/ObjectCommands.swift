/// QEMU's `object-add` / `object-del` (QMP) and `object_add` / `object_del` (HMP), for the
/// objects TLS needs: `tls-creds-psk`, `tls-creds-x509` and `authz-simple`. They go to the
/// process's `SecurityObjects`, which the `tls-creds` and `tls-authz` parameters name.
extension QMPSession {
    /// `{"execute": "object-add", "arguments": {"qom-type": "tls-creds-psk", "id": "tls0",
    /// "endpoint": "server", "dir": "/path"}}`; QEMU 5's nested `"props": {...}` is taken too.
    static let objectAdd = Command(name: "object-add") { _, args in
        let type = try args.string("qom-type")
        let id = try args.string("id")
        var members = args.all.filter { !["qom-type", "id", "props"].contains($0.0) }
        if let props = args.optional("props") {
            guard case .object(let nested) = props else { throw QMPArguments.typeError("props", "object") }
            members += nested
        }
        var properties: [String: String] = [:]
        for (name, value) in members {
            switch value {
            case .string(let s): properties[name] = s
            case .bool(let b): properties[name] = b ? "on" : "off"
            case .int(let i): properties[name] = String(i)
            default: throw QMPArguments.typeError(name, "string")
            }
        }
        try SecurityObjects.shared.add(type: type, id: id, properties: properties)
        return .object([])
    }

    static let objectDel = Command(name: "object-del") { _, args in
        let id = try args.string("id")
        try args.finish()
        try SecurityObjects.shared.delete(id: id)
        return .object([])
    }
}

extension HMPInterpreter {
    /// `object_add tls-creds-psk,id=tls0,endpoint=server,dir=/path`
    static let objectAdd = Command(names: ["object_add"], params: "[qom-type=]type,id=str[,prop=value][,...]",
                                   help: "create QOM object") { _, words, _ in
        let options = try words.string("object_add")
        try words.end("object_add")
        try SecurityObjects.shared.add(commandLine: options.hasPrefix("qom-type=") ? String(options.dropFirst("qom-type=".count)) : options)
        return HMPReply("")
    }

    static let objectDel = Command(names: ["object_del"], params: "id", help: "destroy QOM object") { _, words, _ in
        let id = try words.string("object_del")
        try words.end("object_del")
        try SecurityObjects.shared.delete(id: id)
        return HMPReply("")
    }
}
