package storage

import (
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// etcdKeys builds the keys of one root, and of one scope in it: the whole
// root when it has no host scopes, or one host's; see keys.go for the
// layout.
type etcdKeys struct {
	prefix  string // of the root: IDs, hosts, shared layers
	scope   string // of the records, markers and children index
	owner   string // the host whose scope it is, empty without host scopes
	markers deletionMarkers
	idBlock string
	idFloor string
}

func newEtcdKeys(root string) etcdKeys {
	p := root + "/" + KeyEtcdVersion + "/"
	return etcdKeys{prefix: p, idBlock: p + KeyEtcdIDBlock, idFloor: p + KeyEtcdIDFloor}.inScope(p)
}

// inScope returns the keys of the same root with records under scope.
func (k etcdKeys) inScope(scope string) etcdKeys {
	k.scope = scope
	k.markers = deletionMarkers{
		committed: scope + KeyEtcdSnapshots,
		others:    scope + KeyEtcdOthersRemoved,
		replaced:  scope + KeyEtcdReplaced,
	}
	return k
}

// forHost returns the keys of host's scope of the same root.
func (k etcdKeys) forHost(host string) etcdKeys {
	k = k.inScope(k.prefix + KeyEtcdScopes + "/" + host + "/")
	k.owner = host
	return k
}

func (k etcdKeys) snapshot(name string) string { return k.scope + KeyEtcdSnapshots + "/" + name }

func (k etcdKeys) snapshotRange() (string, string) {
	return k.scope + KeyEtcdSnapshots + "/", k.scope + KeyEtcdSnapshots + "0"
}

func (k etcdKeys) childrenRange() (string, string) {
	start := k.scope + KeyEtcdChildren + "/"
	return start, clientv3.GetPrefixRangeEnd(start)
}

func (k etcdKeys) childPrefix(parent string) string {
	return k.scope + KeyEtcdChildren + "/" + escapeName(parent) + "/"
}

func (k etcdKeys) mode() string            { return k.prefix + KeyEtcdMode }
func (k etcdKeys) host(host string) string { return k.prefix + KeyEtcdHosts + "/" + host }
func (k etcdKeys) lock(host string) string { return k.host(host) + "/" + KeyLock }
func (k etcdKeys) layer(id uint64) string  { return k.prefix + KeyEtcdLayers + "/" + formatID(id) }
func (k etcdKeys) contentPrefix(key string) string {
	return k.prefix + KeyEtcdContent + "/" + escapeName(key) + "/"
}

func (k etcdKeys) child(parent string, child uint64) string {
	return k.childPrefix(parent) + formatID(child)
}

// escapeName makes a snapshot name one path element: '%' and '/' are
// percent-encoded, so no name reaches into another's children.
func escapeName(name string) string {
	if !strings.ContainsAny(name, "%/") {
		return name
	}
	var b strings.Builder
	for i := 0; i < len(name); i++ {
		switch c := name[i]; c {
		case '%':
			b.WriteString("%25")
		case '/':
			b.WriteString("%2F")
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// unescapeName inverts escapeName; it reports false for a string escapeName
// cannot have produced.
func unescapeName(s string) (string, bool) {
	if !strings.Contains(s, "%") {
		return s, !strings.Contains(s, "/")
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '/':
			return "", false
		case c != '%':
			b.WriteByte(c)
		case strings.HasPrefix(s[i:], "%25"):
			b.WriteByte('%')
			i += 2
		case strings.HasPrefix(s[i:], "%2F"):
			b.WriteByte('/')
			i += 2
		default:
			return "", false
		}
	}
	return b.String(), true
}

// recordVersion is the first byte of every etcd record without a content
// key; recordVersionShared that of a binding of a shared layer, which
// carries one (see share.go).
const (
	recordVersion       = 1
	recordVersionShared = 2
)

// encodeRecord is the etcd record format, version 1: the version byte, then
// uvarint ID, kind byte, parent, parent chain, labels (sorted), created and
// updated (time.MarshalBinary), varint inodes and size. Version 2 adds the
// content key of a shared layer's binding at the end. Strings and byte
// fields are uvarint length-prefixed; lists are uvarint count-prefixed.
func encodeRecord(r *record) []byte {
	b := make([]byte, 0, 64+len(r.Parent)+8*len(r.ParentIDs))
	if r.Content != "" {
		b = append(b, recordVersionShared)
	} else {
		b = append(b, recordVersion)
	}
	b = binary.AppendUvarint(b, r.ID)
	b = append(b, byte(r.Kind))
	b = appendBytes(b, []byte(r.Parent))
	b = binary.AppendUvarint(b, uint64(len(r.ParentIDs)))
	for _, id := range r.ParentIDs {
		b = binary.AppendUvarint(b, id)
	}
	b = binary.AppendUvarint(b, uint64(len(r.Labels)))
	for _, k := range slices.Sorted(maps.Keys(r.Labels)) {
		b = appendBytes(b, []byte(k))
		b = appendBytes(b, []byte(r.Labels[k]))
	}
	for _, t := range []time.Time{r.Created, r.Updated} {
		tb, _ := t.MarshalBinary() // fails only for zone offsets of fractional minutes; ours are UTC
		b = appendBytes(b, tb)
	}
	b = binary.AppendVarint(b, r.Usage.Inodes)
	b = binary.AppendVarint(b, r.Usage.Size)
	if r.Content != "" {
		b = appendBytes(b, []byte(r.Content))
	}
	return b
}

func appendBytes(b, v []byte) []byte {
	return append(binary.AppendUvarint(b, uint64(len(v))), v...)
}

// recordDecoder reads a record; the first error sticks.
type recordDecoder struct {
	b   []byte
	err error
}

func (d *recordDecoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("bad %s: %w", what, ErrCorrupt)
	}
}

func (d *recordDecoder) uvarint(what string) uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *recordDecoder) varint(what string) int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

// count reads a list length, refusing one longer than the bytes left could
// hold (each element takes at least min bytes), so corrupt input cannot make
// decoding allocate without bound.
func (d *recordDecoder) count(what string, min int) int {
	n := d.uvarint(what)
	if d.err != nil || n > uint64(len(d.b)/min) {
		d.fail(what)
		return 0
	}
	return int(n)
}

func (d *recordDecoder) bytes(what string) []byte {
	n := d.uvarint(what)
	if d.err != nil || n > uint64(len(d.b)) {
		d.fail(what)
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

// decodeRecord parses encodeRecord's format. Corrupt input, trailing bytes
// and unknown versions give ErrCorrupt; it never panics.
func decodeRecord(b []byte) (*record, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("empty record: %w", ErrCorrupt)
	}
	if b[0] != recordVersion && b[0] != recordVersionShared {
		return nil, fmt.Errorf("unknown record version %d: %w", b[0], ErrCorrupt)
	}
	d := &recordDecoder{b: b[1:]}
	r := &record{ID: d.uvarint("id")}
	if len(d.b) == 0 {
		d.fail("kind")
	} else {
		r.Kind, d.b = snapshots.Kind(d.b[0]), d.b[1:]
	}
	r.Parent = string(d.bytes("parent"))
	if n := d.count("parent chain", 1); n > 0 {
		r.ParentIDs = make([]uint64, n)
		for i := range r.ParentIDs {
			r.ParentIDs[i] = d.uvarint("parent chain")
		}
	}
	if n := d.count("labels", 2); n > 0 {
		r.Labels = make(map[string]string, n)
		for range n {
			k := string(d.bytes("label key"))
			r.Labels[k] = string(d.bytes("label value"))
		}
	}
	for _, t := range []*time.Time{&r.Created, &r.Updated} {
		if tb := d.bytes("timestamp"); d.err == nil {
			if err := t.UnmarshalBinary(tb); err != nil {
				d.fail("timestamp")
			}
			*t = t.UTC() // a zone this package never writes would not encode again
		}
	}
	r.Usage.Inodes = d.varint("inodes")
	r.Usage.Size = d.varint("size")
	if b[0] == recordVersionShared {
		if r.Content = string(d.bytes("content key")); r.Content == "" {
			d.fail("content key")
		}
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("record: trailing bytes")
	}
	if d.err != nil {
		return nil, d.err
	}
	return r, nil
}

// layerVersion is the first byte of every shared layer's record.
const layerVersion = 1

// encodeLayer is the format of layers/<ID>: the version byte, content key,
// parent chain, varint inodes and size, then the references, each a host
// and a name, sorted.
func encodeLayer(l *layer) []byte {
	b := []byte{layerVersion}
	b = appendBytes(b, []byte(l.Content))
	b = binary.AppendUvarint(b, uint64(len(l.ParentIDs)))
	for _, id := range l.ParentIDs {
		b = binary.AppendUvarint(b, id)
	}
	b = binary.AppendVarint(b, l.Usage.Inodes)
	b = binary.AppendVarint(b, l.Usage.Size)
	b = binary.AppendUvarint(b, uint64(len(l.Refs)))
	for _, r := range l.Refs {
		b = appendBytes(b, []byte(r.Host))
		b = appendBytes(b, []byte(r.Name))
	}
	return b
}

// decodeLayer parses encodeLayer's format; like decodeRecord it never
// panics, and anything it cannot read is ErrCorrupt.
func decodeLayer(b []byte) (*layer, error) {
	if len(b) == 0 || b[0] != layerVersion {
		return nil, fmt.Errorf("bad shared layer version: %w", ErrCorrupt)
	}
	d := &recordDecoder{b: b[1:]}
	l := &layer{Content: string(d.bytes("content key"))}
	if n := d.count("parent chain", 1); n > 0 {
		l.ParentIDs = make([]uint64, n)
		for i := range l.ParentIDs {
			l.ParentIDs[i] = d.uvarint("parent chain")
		}
	}
	l.Usage.Inodes = d.varint("inodes")
	l.Usage.Size = d.varint("size")
	if n := d.count("references", 2); n > 0 {
		l.Refs = make([]layerRef, n)
		for i := range l.Refs {
			l.Refs[i] = layerRef{Host: string(d.bytes("reference host")), Name: string(d.bytes("reference name"))}
		}
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("shared layer: trailing bytes")
	}
	if d.err == nil && l.Content == "" {
		d.fail("content key")
	}
	if d.err != nil {
		return nil, d.err
	}
	return l, nil
}
