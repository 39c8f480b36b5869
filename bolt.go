package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// BoltOpt changes the bbolt options a store is opened with, exactly as
// containerd's storage.Opt does. Use with care: NoSync, for one, gives up
// durability.
type BoltOpt func(*bolt.Options) error

// DefaultBoltTimeout is how long NewBoltMetaStore waits for another process
// to release the database file's lock before it fails with ErrLocked. A
// BoltOpt may set another Timeout; zero waits forever.
const DefaultBoltTimeout = 10 * time.Second

// NewBoltMetaStore opens (creating it if needed) the bbolt database file
// dbfile with containerd's layout (see keys.go) and returns a store on it.
// A file written by containerd's store opens unchanged, and containerd opens
// a file written here. A commit that returned nil is on disk (fsync) unless
// a BoltOpt turned syncing off.
//
// The file is opened at once, so a bad path or a lock held by another
// process is reported here: after the timeout (DefaultBoltTimeout unless a
// BoltOpt sets Options.Timeout) with ErrLocked (class Unavailable).
func NewBoltMetaStore(dbfile string, opts ...BoltOpt) (MetaStore, error) {
	options := *bolt.DefaultOptions
	// Statistics are never read; keeping them costs contention.
	options.NoStatistics = true
	options.Timeout = DefaultBoltTimeout
	for _, opt := range opts {
		if err := opt(&options); err != nil {
			return nil, err
		}
	}
	db, err := bolt.Open(dbfile, 0o600, &options)
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("open %s: waited %v: %w", dbfile, options.Timeout, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("failed to open database file %s: %w", dbfile, err)
	}
	return newMetaStore(&boltEngine{db: db}), nil
}

// The layout's keys as bytes, converted once rather than on every access.
var (
	bKeyVersion   = []byte(KeyVersion)
	bKeySnapshots = []byte(KeySnapshots)
	bKeyParents   = []byte(KeyParents)
	bKeyID        = []byte(KeyID)
	bKeyKind      = []byte(KeyKind)
	bKeyParent    = []byte(KeyParent)
	bKeyCreatedAt = []byte(KeyCreatedAt)
	bKeyUpdatedAt = []byte(KeyUpdatedAt)
	bKeyLabels    = []byte(KeyLabels)
	bKeyInodes    = []byte(KeyInodes)
	bKeySize      = []byte(KeySize)
	bKeyParentIDs = []byte(KeyParentIDs)
)

type boltEngine struct {
	db    *bolt.DB
	group boltGroup
}

func (e *boltEngine) begin(_ context.Context, writable bool) (engineTx, error) {
	tx, err := e.db.Begin(writable)
	if err != nil {
		return nil, err
	}
	return newBoltTx(tx), nil
}

func newBoltTx(tx *bolt.Tx) *boltTx {
	bt := &boltTx{tx: tx}
	if bt.version = tx.Bucket(bKeyVersion); bt.version != nil {
		bt.snaps = bt.version.Bucket(bKeySnapshots)
	}
	return bt
}

// parentsBucket returns the parents bucket, looked up on first use: most
// reads never need it.
func (b *boltTx) parentsBucket() *bolt.Bucket {
	if b.parents == nil && b.version != nil {
		b.parents = b.version.Bucket(bKeyParents)
	}
	return b.parents
}

func (e *boltEngine) close() error { return e.db.Close() }

// singleWriter: bbolt has one writer at a time, and a writer that grows the
// file waits for every reader (metastore.go refuses nested writes).
func (e *boltEngine) singleWriter() {}

// boltTx is one bbolt transaction. The buckets are nil until the first write
// creates them, as containerd does.
type boltTx struct {
	tx      *bolt.Tx
	version *bolt.Bucket
	snaps   *bolt.Bucket
	parents *bolt.Bucket // see parentsBucket
	// undo, when set, records how to revert each write: one caller's share
	// of a group commit (bolt_group.go) is undone this way.
	undo *undoLog
}

func (b *boltTx) commit(context.Context) error { return b.tx.Commit() }
func (b *boltTx) rollback() error              { return b.tx.Rollback() }

// ensureBuckets creates the layout's buckets for a write.
func (b *boltTx) ensureBuckets() error {
	if b.snaps != nil && b.parentsBucket() != nil {
		return nil
	}
	b.undo.bucketsCreated(b)
	v, err := b.tx.CreateBucketIfNotExists(bKeyVersion)
	if err != nil {
		return fmt.Errorf("failed to create version bucket: %w", err)
	}
	if b.snaps, err = v.CreateBucketIfNotExists(bKeySnapshots); err != nil {
		return fmt.Errorf("failed to create snapshots bucket: %w", err)
	}
	b.version = v
	if b.parents, err = v.CreateBucketIfNotExists(bKeyParents); err != nil {
		return fmt.Errorf("failed to create parents bucket: %w", err)
	}
	return nil
}

func (b *boltTx) get(_ context.Context, name string) (*record, error) {
	return b.read(name, true)
}

func (b *boltTx) getMany(_ context.Context, names lookupNames) (out [maxLookup]*record, err error) {
	for i, name := range names {
		if out[i], err = b.read(name, false); err != nil {
			return out, err
		}
	}
	return out, nil
}

// read decodes the record of name, nil when there is none; full adds the
// labels, times and usage to its identity.
func (b *boltTx) read(name string, full bool) (*record, error) {
	if b.snaps == nil || name == "" {
		return nil, nil
	}
	sb := b.snaps.Bucket([]byte(name))
	if sb == nil {
		return nil, nil
	}
	r, err := decodeBolt(sb, full)
	if err != nil {
		return nil, fmt.Errorf("snapshot %q: %w", name, err)
	}
	return r, nil
}

func (b *boltTx) put(name string, r *record) error {
	if err := b.ensureBuckets(); err != nil {
		return err
	}
	b.undo.bucketChanged(b.snaps, name)
	sb := b.snaps.Bucket([]byte(name))
	fresh := sb == nil
	if fresh {
		var err error
		if sb, err = b.snaps.CreateBucket([]byte(name)); err != nil {
			return fmt.Errorf("snapshot %q: %w", name, err)
		}
	}
	if err := encodeBolt(sb, r, fresh); err != nil {
		return fmt.Errorf("snapshot %q: %w", name, err)
	}
	return nil
}

func (b *boltTx) delete(name string) error {
	if b.snaps == nil {
		return nil
	}
	b.undo.bucketChanged(b.snaps, name)
	return b.snaps.DeleteBucket([]byte(name))
}

func (b *boltTx) link(parent, child ref) error {
	if err := b.ensureBuckets(); err != nil {
		return err
	}
	k := parentLinkKey(parent.id, child.id)
	b.undo.keyChanged(b.parents, k)
	return b.parents.Put(k, []byte(child.name))
}

func (b *boltTx) unlink(parent, child ref) error {
	if b.parentsBucket() == nil {
		return nil
	}
	k := parentLinkKey(parent.id, child.id)
	b.undo.keyChanged(b.parents, k)
	return b.parents.Delete(k)
}

func (b *boltTx) willCheckChildren(string) {} // a cursor seek is cheap

func (b *boltTx) hasChildren(_ context.Context, p ref) (bool, error) {
	if b.parentsBucket() == nil {
		return false, nil
	}
	prefix := parentLinkPrefix(p.id)
	k, _ := b.parents.Cursor().Seek(prefix)
	return k != nil && bytes.HasPrefix(k, prefix), nil
}

func (b *boltTx) scan(_ context.Context, fn func(name string, r *record, err error) error) error {
	if b.snaps == nil {
		return nil
	}
	return b.snaps.ForEachBucket(func(k []byte) error {
		r, err := decodeBolt(b.snaps.Bucket(k), true)
		return fn(string(k), r, err)
	})
}

func (b *boltTx) scanLinks(_ context.Context, fn func(parent, child ref) error) error {
	if b.parentsBucket() == nil {
		return nil
	}
	return b.parents.ForEach(func(k, v []byte) error {
		parent, n := binary.Uvarint(k)
		if n <= 0 || len(k) <= n || k[n] != 0 {
			return fmt.Errorf("parents key %x: %w", k, ErrCorrupt)
		}
		child, m := binary.Uvarint(k[n+1:])
		if m <= 0 || n+1+m != len(k) {
			return fmt.Errorf("parents key %x: %w", k, ErrCorrupt)
		}
		return fn(ref{id: parent}, ref{name: string(v), id: child})
	})
}

func (b *boltTx) idLimit(context.Context) (uint64, error) {
	if b.snaps == nil {
		return 0, nil
	}
	return b.snaps.Sequence(), nil
}

func (b *boltTx) nextID(context.Context) (uint64, error) {
	if err := b.ensureBuckets(); err != nil {
		return 0, err
	}
	b.undo.sequenceChanged(b.snaps)
	return b.snaps.NextSequence()
}

func (b *boltTx) raiseIDs(_ context.Context, id uint64) error {
	if err := b.ensureBuckets(); err != nil {
		return err
	}
	if b.snaps.Sequence() >= id {
		return nil
	}
	b.undo.sequenceChanged(b.snaps)
	return b.snaps.SetSequence(id)
}

// parentLinkKey is containerd's parents-bucket key: the uvarint parent ID, a
// zero byte, the uvarint child ID.
func parentLinkKey(parent, child uint64) []byte {
	k := binary.AppendUvarint(parentLinkPrefix(parent), child)
	return k
}

func parentLinkPrefix(parent uint64) []byte {
	k := binary.AppendUvarint(make([]byte, 0, 2*binary.MaxVarintLen64+1), parent)
	return append(k, 0)
}

// decodeBolt reads a snapshot bucket in one cursor pass (cheaper than a
// lookup per key); without full, only the record's identity (ID, kind,
// parent, parent chain). Containerd leaves some keys out (usage of non-committed
// snapshots, our parentids) and may add others, which are ignored; anything
// present but malformed, or a missing ID or kind, is ErrCorrupt.
func decodeBolt(sb *bolt.Bucket, full bool) (*record, error) {
	var r record
	var haveID, haveKind bool
	c := sb.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		var err error
		key := string(k)
		if !full && key != KeyID && key != KeyKind && key != KeyParent && key != KeyParentIDs {
			continue
		}
		switch key {
		case KeyID:
			var n int
			r.ID, n = binary.Uvarint(v)
			haveID = n > 0
		case KeyKind:
			haveKind = len(v) == 1
			if haveKind {
				r.Kind = snapshots.Kind(v[0])
			}
		case KeyParent:
			r.Parent = string(v)
		case KeyCreatedAt:
			err = decodeBoltTime(v, &r.Created)
		case KeyUpdatedAt:
			err = decodeBoltTime(v, &r.Updated)
		case KeyInodes:
			err = decodeBoltVarint(v, &r.Usage.Inodes)
		case KeySize:
			err = decodeBoltVarint(v, &r.Usage.Size)
		case KeyParentIDs:
			for len(v) > 0 {
				id, n := binary.Uvarint(v)
				if n <= 0 {
					err = ErrCorrupt
					break
				}
				r.ParentIDs = append(r.ParentIDs, id)
				v = v[n:]
			}
		case KeyLabels:
			if v == nil {
				r.Labels = decodeBoltLabels(sb.Bucket(bKeyLabels))
			}
		}
		if err != nil {
			return nil, fmt.Errorf("bad %q: %v: %w", k, err, ErrCorrupt)
		}
	}
	if !haveID {
		return nil, fmt.Errorf("bad %q: %w", KeyID, ErrCorrupt)
	}
	if !haveKind {
		return nil, fmt.Errorf("bad %q: %w", KeyKind, ErrCorrupt)
	}
	return &r, nil
}

func decodeBoltTime(v []byte, t *time.Time) error {
	if err := t.UnmarshalBinary(v); err != nil {
		return err
	}
	*t = t.UTC() // a zone this package never writes would not encode again
	return nil
}

func decodeBoltVarint(v []byte, x *int64) error {
	n := 0
	if *x, n = binary.Varint(v); n <= 0 {
		return errors.New("bad varint")
	}
	return nil
}

// decodeBoltLabels reads a labels bucket; containerd may leave an empty one,
// which is no labels.
func decodeBoltLabels(lb *bolt.Bucket) map[string]string {
	var labels map[string]string
	_ = lb.ForEach(func(k, v []byte) error {
		if labels == nil {
			labels = map[string]string{}
		}
		labels[string(k)] = string(v)
		return nil
	})
	return labels
}

// encodeBolt writes r into a snapshot bucket the way containerd does, plus
// the parent chain; fresh says the bucket was just created (nothing to
// delete).
func encodeBolt(sb *bolt.Bucket, r *record, fresh bool) error {
	put := func(key, v []byte) error {
		switch {
		case v != nil:
			return sb.Put(key, v)
		case fresh:
			return nil
		}
		return sb.Delete(key)
	}
	// bbolt keeps the value slices until the transaction ends, so each is
	// cut, capacity-capped, from one buffer: one allocation for them all.
	buf := make([]byte, 0, binary.MaxVarintLen64*(3+len(r.ParentIDs))+2*16+1+len(r.Parent))
	var from int
	mark := func() { from = len(buf) }
	cut := func() []byte { return buf[from:len(buf):len(buf)] }

	mark()
	buf = binary.AppendUvarint(buf, r.ID)
	id := cut()
	mark()
	buf = append(buf, byte(r.Kind))
	kind := cut()
	var err error
	mark()
	if buf, err = r.Created.AppendBinary(buf); err != nil {
		return err
	}
	created := cut()
	mark()
	if buf, err = r.Updated.AppendBinary(buf); err != nil {
		return err
	}
	updated := cut()
	var parent, inodes, size, chain []byte
	if r.Parent != "" {
		mark()
		buf = append(buf, r.Parent...)
		parent = cut()
	}
	if r.Kind == snapshots.KindCommitted {
		mark()
		buf = binary.AppendVarint(buf, r.Usage.Inodes)
		inodes = cut()
		mark()
		buf = binary.AppendVarint(buf, r.Usage.Size)
		size = cut()
	}
	if len(r.ParentIDs) > 0 {
		mark()
		for _, pid := range r.ParentIDs {
			buf = binary.AppendUvarint(buf, pid)
		}
		chain = cut()
	}
	for _, kv := range []struct {
		key []byte
		v   []byte
	}{
		{bKeyID, id},
		{bKeyKind, kind},
		{bKeyParent, parent},
		{bKeyCreatedAt, created},
		{bKeyUpdatedAt, updated},
		{bKeyInodes, inodes},
		{bKeySize, size},
		{bKeyParentIDs, chain},
	} {
		if err := put(kv.key, kv.v); err != nil {
			return fmt.Errorf("failed to write %q: %w", kv.key, err)
		}
	}
	return writeBoltLabels(sb, r.Labels, fresh)
}

// writeBoltLabels replaces the labels bucket; containerd keeps no bucket for
// no labels.
func writeBoltLabels(sb *bolt.Bucket, labels map[string]string, fresh bool) error {
	if !fresh && sb.Bucket(bKeyLabels) != nil {
		if err := sb.DeleteBucket(bKeyLabels); err != nil {
			return err
		}
	}
	if len(labels) == 0 {
		return nil
	}
	lb, err := sb.CreateBucket(bKeyLabels)
	if err != nil {
		return err
	}
	for k, v := range labels {
		if err := lb.Put([]byte(k), []byte(v)); err != nil {
			return fmt.Errorf("failed to set label %q: %w", k, err)
		}
	}
	return nil
}
