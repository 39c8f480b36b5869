package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// BoltOpt changes the bbolt options a store is opened with, exactly as
// containerd's storage.Opt does. Use with care: NoSync, for one, gives up
// durability.
type BoltOpt func(*bolt.Options) error

// DefaultBoltTimeout is about how long NewBoltMetaStore waits for the
// database file's lock (held by another process, or by a store of this one
// not closed yet) before it fails with ErrLocked: bbolt gives up within
// 50 ms of it. A BoltOpt may set another Timeout; zero waits forever.
const DefaultBoltTimeout = 10 * time.Second

// NewBoltMetaStore opens (creating it if needed) the bbolt database file
// dbfile with containerd's layout (see keys.go) and returns a store on it.
// A file written by containerd's store opens unchanged, and containerd opens
// a file written here. A commit that returned nil is on disk (fsync) unless
// a BoltOpt turned syncing off.
//
// The file is opened at once, so a bad path or a lock held by another
// process is reported here: after about the timeout (DefaultBoltTimeout
// unless a BoltOpt sets Options.Timeout; bbolt gives up within 50 ms of
// it) with ErrLocked (class Unavailable).
//
// A damaged file never panics the caller: opening it, or any later read,
// walk, check or write that meets the damage, fails with ErrDamaged (class
// DataLoss), whose message names the file and 'snapmeta salvage'. A file
// whose meta pages or size show the damage is refused here, before bbolt
// maps it, and so is a file whose tree would take bbolt outside the file
// or down a cycle of pages (or nests inline buckets past a bound). The
// open reads the tree from the file once (see bolt_pages.go); a file whose
// tree is damaged otherwise opens for reads only: every write is refused
// with ErrDamaged.
func NewBoltMetaStore(dbfile string, opts ...BoltOpt) (MetaStore, error) {
	options := *bolt.DefaultOptions
	// Statistics are never read; keeping them costs contention.
	options.NoStatistics = true
	options.Timeout = DefaultBoltTimeout
	settings := &boltOptions{parallel: boltParallelDefault}
	boltOptionsOf.Store(&options, settings)
	defer boltOptionsOf.Delete(&options)
	for _, opt := range opts {
		if err := opt(&options); err != nil {
			return nil, err
		}
	}
	if err := checkBoltFile(dbfile); err != nil {
		return nil, err
	}
	_, statErr := os.Stat(dbfile)
	creates := errors.Is(statErr, os.ErrNotExist) && !options.ReadOnly
	db, err := openBolt(dbfile, &options)
	switch {
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("open %s: waited %v: %w", dbfile, options.Timeout, ErrLocked)
	case errors.Is(err, ErrDamaged):
		return nil, err
	case errors.Is(boltErr(err), ErrCorrupt):
		// bbolt found the file invalid (checksums, version): damaged too.
		return nil, damagedErr(dbfile, err)
	case err != nil:
		return nil, fmt.Errorf("failed to open database file %s: %w", dbfile, boltErr(err))
	}
	damage, err := treeDamage(db, dbfile)
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	if creates && !options.NoSync {
		// bbolt fsyncs the file, not its name: without the directory's
		// fsync a power cut can take a new file, commits and all.
		if err := syncDir(filepath.Dir(dbfile)); err != nil {
			_ = db.Close()
			return nil, fmt.Errorf("failed to make %s durable: %w", dbfile, boltErr(err))
		}
	}
	eng := &boltEngine{db: db, path: dbfile}
	if damage != nil {
		eng.markDamaged(damage)
	}
	if settings.parallel && !options.ReadOnly {
		eng.par = &boltParallel{}
		if err := eng.seedIDs(); err != nil {
			_ = db.Close()
			return nil, err
		}
	}
	return newMetaStore(eng), nil
}

// syncDir fsyncs a directory, making the names in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
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
	path  string // for the messages of ErrDamaged
	group boltGroup
	// damaged is set when the open found the tree damaged, or once a
	// panic of bbolt in a writable transaction was recovered: every later
	// write is refused with it (see markDamaged).
	damaged atomic.Pointer[error]
	// par is set in parallel mode (WithParallelCallbacks): see
	// bolt_parallel.go.
	par *boltParallel
}

func (e *boltEngine) begin(_ context.Context, writable bool) (engineTx, error) {
	if writable {
		if err := e.writeRefusal(); err != nil {
			return nil, err
		}
	}
	var tx *bolt.Tx
	err := e.guarded(nil, func() (err error) {
		tx, err = e.db.Begin(writable)
		return boltErr(err)
	})
	if err != nil {
		return nil, err
	}
	return e.newBoltTx(tx)
}

// guarded runs fn, a bbolt call outside the hot paths, under guard.
func (e *boltEngine) guarded(tx *boltTx, fn func() error) (err error) {
	prev := debug.SetPanicOnFault(true)
	defer e.guard(prev, tx, &err, nil)
	return fn()
}

// newBoltTx wraps a bbolt transaction begun by e. Its first lookups read
// the file; when they meet damage the transaction is rolled back, so that
// it does not hold bbolt's locks.
func (e *boltEngine) newBoltTx(tx *bolt.Tx) (*boltTx, error) {
	return e.initBoltTx(&boltTx{}, tx)
}

// initBoltTx is newBoltTx into bt, which it overwrites.
func (e *boltEngine) initBoltTx(bt *boltTx, tx *bolt.Tx) (*boltTx, error) {
	*bt = boltTx{tx: tx, eng: e, writable: tx.Writable()}
	if e.par != nil && bt.writable {
		bt.ws = &writeSet{}
	}
	if err := e.guarded(bt, bt.lookupLayout); err != nil {
		_ = bt.rollback()
		return nil, err
	}
	return bt, nil
}

// lookupLayout finds the layout's top buckets.
func (bt *boltTx) lookupLayout() error {
	tx := bt.tx
	// bbolt keeps no plain key at its top level: v1 is a bucket or absent.
	if bt.version = tx.Bucket(bKeyVersion); bt.version != nil {
		var err error
		if bt.snaps, err = layoutBucket(bt.version, bKeySnapshots); err != nil {
			bt.damage = fmt.Errorf("%q is %w", KeyVersion+"/"+KeySnapshots, err)
		}
	}
	return nil
}

// layoutBucket returns the bucket key of parent, nil when there is none
// yet, and ErrCorrupt when a plain key stands where the layout has a
// bucket: the store is damaged, not empty. Only a missing bucket costs a
// second seek.
func layoutBucket(parent *bolt.Bucket, key []byte) (*bolt.Bucket, error) {
	if b := parent.Bucket(key); b != nil {
		return b, nil
	}
	if k, _ := parent.Cursor().Seek(key); bytes.Equal(k, key) {
		return nil, fmt.Errorf("a plain key, not a bucket: %w", ErrCorrupt)
	}
	return nil, nil
}

// snapshotBucket is layoutBucket(b.snaps, key), with its seeks that tell
// a missing bucket from a plain key through the transaction's reused
// cursor. A writer seeks with it first: it often looks for names that are
// not there yet (creates), and a bucket found is then opened from bbolt's
// cache of the transaction's buckets, or by a second seek. A reader opens
// the bucket first: it mostly finds it.
func (b *boltTx) snapshotBucket(key []byte) (*bolt.Bucket, error) {
	if !b.writable {
		if sb := b.snaps.Bucket(key); sb != nil {
			return sb, nil
		}
	}
	if k, _ := cursorOf(&b.snapsCur, b.snaps).Seek(key); !bytes.Equal(k, key) {
		return nil, nil
	}
	if sb := b.snaps.Bucket(key); sb != nil {
		return sb, nil
	}
	return nil, fmt.Errorf("a plain key, not a bucket: %w", ErrCorrupt)
}

// cursorOf returns cur, made anew when it is not a cursor of bk. (A
// cursor kept by value costs no allocation of its own.)
func cursorOf(cur *bolt.Cursor, bk *bolt.Bucket) *bolt.Cursor {
	if cur.Bucket() != bk {
		*cur = *bk.Cursor()
	}
	return cur
}

// parentsBucket returns the parents bucket, looked up on first use: most
// reads never need it.
func (b *boltTx) parentsBucket() (*bolt.Bucket, error) {
	if b.parents == nil && b.version != nil {
		var err error
		if b.parents, err = layoutBucket(b.version, bKeyParents); err != nil {
			return nil, fmt.Errorf("%q is %w", KeyVersion+"/"+KeyParents, err)
		}
	}
	return b.parents, nil
}

// layoutDamage reports a plain key where the layout has the snapshots or
// the parents bucket (a plain key for a snapshot's bucket is that record's
// damage, which scan reports).
func (b *boltTx) layoutDamage() (err error) {
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if b.damage != nil {
		return b.damage
	}
	_, err = b.parentsBucket()
	return err
}

func (e *boltEngine) close() error {
	return e.guarded(nil, func() error { return boltErr(e.db.Close()) })
}

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
	// damage is set when v1/snapshots is a plain key: every use of the
	// snapshots fails with it rather than finding an empty store.
	damage error
	// undo, when set, records how to revert each write: one caller's share
	// of a group commit (bolt_group.go) is undone this way.
	undo *undoLog
	// snapsCur and parentsCur are cursors of snaps and parents reused by
	// the lookups that need one: a fresh bbolt cursor allocates its path on
	// every seek. A seek searches afresh from the bucket's root, so a
	// write between two seeks does not matter.
	snapsCur, parentsCur bolt.Cursor
	// ws, in parallel mode, collects what a writable transaction writes,
	// for validating optimistic transactions (bolt_parallel.go).
	ws *writeSet

	eng      *boltEngine
	writable bool
	// broken is set when a panic of bbolt was recovered in this writable
	// transaction: its state is unknown, so it never commits, and every
	// later write in it fails with broken.
	broken error
}

// commit commits, unless the transaction or the store met damage: then it
// rolls back and says so.
func (b *boltTx) commit(context.Context) error {
	if err := b.writeRefusal(); err != nil {
		_ = b.rollback()
		return err
	}
	commit := func() error { return b.eng.guarded(b, func() error { return boltErr(b.tx.Commit()) }) }
	var err error
	if b.eng.par != nil {
		err = b.commitParallel(commit)
	} else {
		err = commit()
	}
	if b.broken != nil {
		// The panic left the transaction open, holding the writer's lock.
		_ = b.rollback()
	}
	return err
}

func (b *boltTx) rollback() error {
	var tx *boltTx
	if b.writable {
		tx = b // a panic here may leave the writer's lock held
	}
	err := b.eng.guarded(tx, func() error { return boltErr(b.tx.Rollback()) })
	if b.broken != nil && errors.Is(err, ErrTransactionDone) {
		return nil // bbolt's commit ended it before it panicked
	}
	return err
}

// writeRefusal is why a write in b must not happen, if it must not.
func (b *boltTx) writeRefusal() error {
	if b.broken != nil {
		return b.broken
	}
	return b.eng.writeRefusal()
}

// ensureBuckets creates the layout's buckets for a write. A damaged layout
// is reported before anything is written (or logged for undoing).
func (b *boltTx) ensureBuckets() error {
	if err := b.layoutDamage(); err != nil {
		return err
	}
	if b.snaps != nil && b.parents != nil {
		return nil
	}
	b.undo.bucketsCreated(b)
	v, err := b.tx.CreateBucketIfNotExists(bKeyVersion)
	if err != nil {
		return fmt.Errorf("failed to create version bucket: %w", boltErr(err))
	}
	if b.snaps, err = v.CreateBucketIfNotExists(bKeySnapshots); err != nil {
		return fmt.Errorf("failed to create snapshots bucket: %w", boltErr(err))
	}
	b.version = v
	if b.parents, err = v.CreateBucketIfNotExists(bKeyParents); err != nil {
		return fmt.Errorf("failed to create parents bucket: %w", boltErr(err))
	}
	return nil
}

func (b *boltTx) get(_ context.Context, name string) (r *record, err error) {
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	return b.read(name, true)
}

func (b *boltTx) getMany(_ context.Context, names lookupNames) (out [maxLookup]*record, err error) {
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
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
		return nil, b.damage
	}
	sb, err := b.snapshotBucket([]byte(name))
	if sb == nil {
		return nil, snapshotErr(name, err)
	}
	r, err := decodeBolt(sb, full)
	if err != nil {
		return nil, fmt.Errorf("snapshot %q: %w", name, err)
	}
	if err := b.wholeChain(name, r); err != nil {
		return nil, err
	}
	return r, nil
}

func (b *boltTx) put(name string, r *record) (err error) {
	if err := b.writeRefusal(); err != nil {
		return err
	}
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if err := b.ensureBuckets(); err != nil {
		return err
	}
	b.ws.addName(name)
	key := []byte(name)
	// Creating first costs a new record (the usual case) one seek.
	sb, err := b.snaps.CreateBucket(key)
	fresh := err == nil
	switch {
	case fresh:
		b.undo.bucketCreated(b.snaps, key)
	case errors.Is(err, berrors.ErrBucketExists):
		sb = b.snaps.Bucket(key)
		b.undo.bucketChanged(b.snaps, key, sb)
	default:
		return snapshotErr(name, boltErr(err))
	}
	stored := *r
	stored.ParentIDs, stored.ChainFrom = b.piece(r)
	if err := encodeBolt(sb, &stored, fresh); err != nil {
		return snapshotErr(name, boltErr(err))
	}
	return nil
}

// snapshotErr names the snapshot in err; nil stays nil.
func snapshotErr(name string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("snapshot %q: %w", name, err)
}

func (b *boltTx) delete(name string) (err error) {
	if err := b.writeRefusal(); err != nil {
		return err
	}
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if b.snaps == nil {
		return b.damage
	}
	key := []byte(name)
	if b.undo != nil {
		b.undo.bucketChanged(b.snaps, key, b.snaps.Bucket(key))
	}
	b.ws.addName(name)
	return boltErr(b.snaps.DeleteBucket(key))
}

func (b *boltTx) link(parent, child ref) (err error) {
	if err := b.writeRefusal(); err != nil {
		return err
	}
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if err := b.ensureBuckets(); err != nil {
		return err
	}
	k := parentLinkKey(parent.id, child.id)
	if b.undo != nil {
		b.undo.keyChanged(cursorOf(&b.parentsCur, b.parents), k)
	}
	b.ws.addParent(parent.id)
	return boltErr(b.parents.Put(k, []byte(child.name)))
}

func (b *boltTx) unlink(parent, child ref) (err error) {
	if err := b.writeRefusal(); err != nil {
		return err
	}
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if p, err := b.parentsBucket(); p == nil {
		return err
	}
	k := parentLinkKey(parent.id, child.id)
	if b.undo != nil {
		b.undo.keyChanged(cursorOf(&b.parentsCur, b.parents), k)
	}
	b.ws.addParent(parent.id)
	return boltErr(b.parents.Delete(k))
}

func (b *boltTx) willCheckChildren(string) {} // a cursor seek is cheap

// maxName is bbolt's key limit: containerd's store takes names up to it.
func (b *boltTx) maxName() int { return bolt.MaxKeySize }

func (b *boltTx) hasChildren(_ context.Context, p ref) (_ bool, err error) {
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if pb, err := b.parentsBucket(); pb == nil {
		return false, err
	}
	var pb [parentLinkKeyMax]byte
	prefix := appendParentLinkPrefix(pb[:0], p.id)
	k, _ := cursorOf(&b.parentsCur, b.parents).Seek(prefix)
	return k != nil && bytes.HasPrefix(k, prefix), nil
}

// scan walks the snapshot buckets in name order. fn may write, and each
// name is reported as the transaction holds it when the walk reaches it: a
// snapshot created ahead of the walk is visited, one removed ahead of it is
// not, and one created behind it is not.
// A plain key where a snapshot's bucket belongs is a record that does not
// decode.
//
// A panic of bbolt becomes ErrDamaged; a panic of fn goes on unchanged.
func (b *boltTx) scan(_ context.Context, fn func(name string, r *record, err error) error) (err error) {
	inFn := false
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, &inFn)
	if b.snaps == nil {
		return b.damage
	}
	// A write to the bucket leaves a bbolt cursor pointing into stale
	// pages or shifted nodes (it then skips, repeats or reaches removed
	// keys); Seek searches afresh from the bucket's root. So a writable
	// transaction seeks past the last name reached after every call of fn.
	// A read-only one cannot write, and steps on.
	reseek := b.tx.Writable()
	var past []byte // the last name reached and a zero byte: the least key after it
	var rec record  // every record is decoded into it
	c := b.snaps.Cursor()
	for k, _ := c.First(); k != nil; {
		// k lies in bbolt's memory, which fn's writes may change: copy it.
		past = append(append(past[:0], k...), 0)
		// A key of the snapshots bucket that is not a bucket is no
		// snapshot, and its record does not decode.
		var r *record
		sb, derr := layoutBucket(b.snaps, k)
		switch {
		case sb != nil:
			if derr = decodeBoltInto(&rec, sb, true); derr == nil {
				r = &rec
			}
		case derr == nil:
			// The cursor reached k, but a lookup of k does not: its page
			// is damaged (its keys are out of order).
			derr = fmt.Errorf("the key cannot be looked up: its page is out of order: %w", ErrCorrupt)
		}
		inFn = true
		err := fn(string(k), r, derr)
		inFn = false
		if err != nil {
			return err
		}
		if reseek {
			k, _ = c.Seek(past)
		} else {
			k, _ = c.Next()
		}
	}
	return nil
}

func (b *boltTx) scanLinks(_ context.Context, fn func(parent, child ref, err error) error) (err error) {
	inFn := false
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, &inFn)
	if p, err := b.parentsBucket(); p == nil {
		return err
	}
	return boltErr(b.parents.ForEach(func(k, v []byte) error {
		parent, child, ok := decodeParentLinkKey(k)
		pr, cr, derr := ref{id: parent}, ref{name: string(v), id: child}, error(nil)
		if !ok || v == nil {
			pr, cr, derr = ref{}, ref{name: string(v)}, fmt.Errorf("parents key %x is not a link's: %w", k, ErrCorrupt)
		}
		inFn = true
		err := fn(pr, cr, derr)
		inFn = false
		return err
	}))
}

// readRecords reads each record from its bucket, as scan decodes it: a
// chain piece as stored.
func (b *boltTx) readRecords(_ context.Context, names []string, fn func(int, *record, error)) (err error) {
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if b.snaps == nil {
		return b.damage
	}
	var rec record
	for i, name := range names {
		sb, derr := b.snapshotBucket([]byte(name))
		if sb != nil {
			derr = decodeBoltInto(&rec, sb, true) // as scan does: what it cannot decode is absent
		}
		switch {
		case derr != nil:
			fn(i, nil, derr)
		case sb == nil:
			fn(i, nil, nil)
		default:
			fn(i, &rec, nil)
		}
	}
	return nil
}

// indexedParent: bbolt keys the index by the parent's ID.
func (b *boltTx) indexedParent(name string, id uint64) ref { return boltIndexedParent(name, id) }

// boltIndexedParent is the part of a parent that bbolt's children index is
// keyed by, its ID: the layout's, for every reader of a bbolt file.
func boltIndexedParent(_ string, id uint64) ref { return ref{id: id} }

func (b *boltTx) readLinks(_ context.Context, links []link, fn func(int, ref, string, bool)) (err error) {
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if p, err := b.parentsBucket(); p == nil && err != nil {
		return err
	}
	var kb [parentLinkKeyMax]byte
	for i, l := range links {
		var v []byte
		if b.parents != nil {
			v = b.parents.Get(appendParentLinkKey(kb[:0], l.parent.id, l.child.id))
		}
		fn(i, boltIndexedParent(l.parent.name, l.parent.id), string(v), v != nil)
	}
	return nil
}

func (b *boltTx) idLimit(context.Context) (_ uint64, err error) {
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if b.snaps == nil {
		return 0, b.damage
	}
	return b.snaps.Sequence(), nil
}

func (b *boltTx) nextID(context.Context) (_ uint64, err error) {
	if err := b.writeRefusal(); err != nil {
		return 0, err
	}
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	// NextSequence would wrap to 0; checked before anything is written.
	if b.snaps != nil && b.snaps.Sequence() == math.MaxUint64 {
		return 0, ErrIDsExhausted
	}
	if err := b.ensureBuckets(); err != nil {
		return 0, err
	}
	if p := b.eng.par; p != nil {
		// Parallel mode: every writer draws from the one allocator,
		// and the sequence covers every ID stored.
		id, err := p.nextID()
		if err != nil {
			return 0, err
		}
		if b.snaps.Sequence() < id {
			b.undo.sequenceChanged(b.snaps)
			if err := b.snaps.SetSequence(id); err != nil {
				return 0, boltErr(err)
			}
		}
		return id, nil
	}
	b.undo.sequenceChanged(b.snaps)
	id, err := b.snaps.NextSequence()
	return id, boltErr(err)
}

func (b *boltTx) raiseIDs(_ context.Context, id uint64) (err error) {
	if err := b.writeRefusal(); err != nil {
		return err
	}
	prev := debug.SetPanicOnFault(true)
	defer b.eng.guard(prev, b, &err, nil)
	if err := b.ensureBuckets(); err != nil {
		return err
	}
	if p := b.eng.par; p != nil {
		p.raise(id)
	}
	if b.snaps.Sequence() >= id {
		return nil
	}
	b.undo.sequenceChanged(b.snaps)
	return boltErr(b.snaps.SetSequence(id))
}

// parentLinkKey is containerd's parents-bucket key: the uvarint parent ID, a
// zero byte, the uvarint child ID.
func parentLinkKey(parent, child uint64) []byte {
	return appendParentLinkKey(make([]byte, 0, parentLinkKeyMax), parent, child)
}

func parentLinkPrefix(parent uint64) []byte {
	return appendParentLinkPrefix(make([]byte, 0, parentLinkKeyMax), parent)
}

// parentLinkKeyMax is the longest parents-bucket key.
const parentLinkKeyMax = 2*binary.MaxVarintLen64 + 1

// appendParentLinkKey appends parentLinkKey(parent, child) to dst.
func appendParentLinkKey(dst []byte, parent, child uint64) []byte {
	return binary.AppendUvarint(appendParentLinkPrefix(dst, parent), child)
}

func appendParentLinkPrefix(dst []byte, parent uint64) []byte {
	return append(binary.AppendUvarint(dst, parent), 0)
}

// decodeParentLinkKey inverts parentLinkKey. Only the canonical key
// decodes: a longer varint of the same ID (0x81 0x00 for 1) escapes the
// seek of hasChildren, so it links nothing.
func decodeParentLinkKey(k []byte) (parent, child uint64, ok bool) {
	parent, n := binary.Uvarint(k)
	if n <= 0 || len(k) <= n || k[n] != 0 {
		return 0, 0, false
	}
	child, m := binary.Uvarint(k[n+1:])
	if m <= 0 {
		return 0, 0, false
	}
	return parent, child, bytes.Equal(k, parentLinkKey(parent, child))
}

// errBoltNotValue is a bucket where the layout has a value.
var errBoltNotValue = errors.New("a bucket, not a value")

// decodeBolt reads a snapshot bucket in one cursor pass (cheaper than a
// lookup per key); without full, only the record's identity (ID, kind,
// parent, parent chain). Containerd leaves some keys out (usage of non-committed
// snapshots, our parentids) and may add others, which are ignored; anything
// present but malformed (a bucket where the layout has a value, or the other
// way round, included), or a missing ID or kind, is ErrCorrupt.
func decodeBolt(sb *bolt.Bucket, full bool) (*record, error) {
	r := new(record)
	if err := decodeBoltInto(r, sb, full); err != nil {
		return nil, err
	}
	return r, nil
}

// boltLongestRecordKey is the length of the longest key of a record's
// bucket (KeyChainPiece).
const boltLongestRecordKey = len(KeyChainPiece)

// decodeBoltInto is decodeBolt into r, which it overwrites.
func decodeBoltInto(r *record, sb *bolt.Bucket, full bool) error {
	*r = record{}
	var haveID, haveKind, whole, inPieces bool
	c := sb.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if len(k) > boltLongestRecordKey {
			// Not a key of the layout (ignored, as unknown keys are),
			// and perhaps a damaged length: no copy of it is made.
			continue
		}
		var err error
		key := string(k)
		if !full && key != KeyID && key != KeyKind && key != KeyParent && key != KeyParentIDs && key != KeyChainPiece {
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
			if v == nil {
				err = errBoltNotValue // would read as no parent
			}
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
			whole = true
			r.ParentIDs, err = decodeUvarints(v)
		case KeyChainPiece:
			inPieces = true
			r.ChainFrom, r.ParentIDs, err = decodeChainPiece(v)
		case KeyLabels:
			if v != nil {
				err = errors.New("a plain key, not a bucket") // would read as no labels
				break
			}
			r.Labels = decodeBoltLabels(sb.Bucket(bKeyLabels))
		}
		if err != nil {
			return fmt.Errorf("bad %q: %v: %w", k, err, ErrCorrupt)
		}
	}
	if !haveID {
		return fmt.Errorf("bad %q: %w", KeyID, ErrCorrupt)
	}
	if whole && inPieces {
		return fmt.Errorf("bad parent chain: both %q and %q: %w", KeyParentIDs, KeyChainPiece, ErrCorrupt)
	}
	if !haveKind {
		return fmt.Errorf("bad %q: %w", KeyKind, ErrCorrupt)
	}
	return nil
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
// which is no labels. The keys and values are cut from one string: one
// allocation rather than two a label.
func decodeBoltLabels(lb *bolt.Bucket) map[string]string {
	var (
		buf  [512]byte
		data = buf[:0]
		idx  [32]int // where each key and each value ends in data, in turn
		ends = idx[:0]
	)
	c := lb.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		data = append(data, k...)
		ends = append(ends, len(data))
		data = append(data, v...)
		ends = append(ends, len(data))
	}
	if len(ends) == 0 {
		return nil
	}
	all := string(data)
	labels := make(map[string]string, len(ends)/2)
	from := 0
	for i := 0; i < len(ends); i += 2 {
		labels[all[from:ends[i]]] = all[ends[i]:ends[i+1]]
		from = ends[i+1]
	}
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
	buf := make([]byte, 0, binary.MaxVarintLen64*(3+len(r.ParentIDs))+2*16+1+len(r.Parent)+binary.MaxVarintLen64+len(r.ChainFrom))
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
	var parent, inodes, size, chain, piece []byte
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
	switch {
	case r.ChainFrom != "":
		mark()
		buf = encodeChainPiece(buf, r.ChainFrom, r.ParentIDs)
		piece = cut()
	case len(r.ParentIDs) > 0:
		mark()
		buf = appendUvarints(buf, r.ParentIDs)
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
		{bKeyChainPiece, piece},
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
	// bbolt keeps the values until the transaction ends: the keys and
	// values are cut, capacity-capped, from one buffer.
	size := 0
	for k, v := range labels {
		size += len(k) + len(v)
	}
	buf := make([]byte, 0, size)
	for k, v := range labels {
		from := len(buf)
		buf = append(buf, k...)
		key := buf[from:len(buf):len(buf)]
		from = len(buf)
		buf = append(buf, v...)
		if err := lb.Put(key, buf[from:len(buf):len(buf)]); err != nil {
			return fmt.Errorf("failed to set label %q: %w", k, err)
		}
	}
	return nil
}

// commitOrRollback ends the shared transaction of a group commit: commit
// when some member's share is in it (unless it met damage), else rollback.
func (b *boltTx) commitOrRollback(commit bool) error {
	if commit || b.broken != nil {
		return b.commit(context.Background())
	}
	return b.rollback()
}
