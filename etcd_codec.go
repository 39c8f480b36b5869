package storage

import (
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// etcdKeys builds the keys of one root; see keys.go for the layout.
type etcdKeys struct {
	prefix  string
	markers deletionMarkers
	idBlock string
	idFloor string
}

func newEtcdKeys(root string) etcdKeys {
	p := root + "/" + KeyEtcdVersion + "/"
	return etcdKeys{
		prefix: p,
		markers: deletionMarkers{
			committed: p + KeyEtcdSnapshots,
			others:    p + KeyEtcdOthersRemoved,
			replaced:  p + KeyEtcdReplaced,
		},
		idBlock: p + KeyEtcdIDBlock,
		idFloor: p + KeyEtcdIDFloor,
	}
}

func (k etcdKeys) snapshot(name string) string { return k.prefix + KeyEtcdSnapshots + "/" + name }

func (k etcdKeys) snapshotRange() (string, string) {
	return k.prefix + KeyEtcdSnapshots + "/", k.prefix + KeyEtcdSnapshots + "0"
}

func (k etcdKeys) childPrefix(parent string) string {
	return k.prefix + KeyEtcdChildren + "/" + escapeName(parent) + "/"
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

// recordVersion is the first byte of every etcd record.
const recordVersion = 1

// encodeRecord is the etcd record format, version 1: the version byte, then
// uvarint ID, kind byte, parent, parent chain, labels (sorted), created and
// updated (time.MarshalBinary), varint inodes and size. Strings and byte
// fields are uvarint length-prefixed; lists are uvarint count-prefixed.
func encodeRecord(r *record) []byte {
	b := make([]byte, 0, 64+len(r.Parent)+8*len(r.ParentIDs))
	b = append(b, recordVersion)
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
	return binary.AppendVarint(b, r.Usage.Size)
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
	if b[0] != recordVersion {
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
	if d.err == nil && len(d.b) != 0 {
		d.fail("record: trailing bytes")
	}
	if d.err != nil {
		return nil, d.err
	}
	return r, nil
}
