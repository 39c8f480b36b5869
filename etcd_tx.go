package storage

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
)

// childPeek is a read of the first keys of a children prefix.
type childPeek struct {
	keys []*mvccpb.KeyValue
	more bool
}

// etcdTx is an optimistic transaction: reads at one revision, buffered
// writes, and one guarded Txn at commit (see etcd_guard.go for the guards).
// It reads and writes the records of one scope (keys); views of other
// scopes of the root share its state (see view).
type etcdTx struct {
	*etcdTxState
	keys etcdKeys
}

// view returns the same transaction over the records of another scope of
// the root: reads at the same revision, writes in the same Txn.
func (t *etcdTx) view(keys etcdKeys) *etcdTx { return &etcdTx{etcdTxState: t.etcdTxState, keys: keys} }

// etcdTxState is what every view of one transaction shares.
type etcdTxState struct {
	e        *etcdEngine
	writable bool

	rev int64 // read revision; 0 until the first read
	// snap is the watch cache's copy the transaction reads, at rev; nil
	// when it reads etcd (see etcd_cache.go).
	snap *cacheState
	// copyChosen is set once the transaction has chosen between the copy
	// and etcd, at its first read.
	copyChosen bool
	// confirmed is set while everything read from the copy has been
	// confirmed against etcd (see checkRefusal).
	confirmed bool
	reads     readSet // point reads
	ranges    rangeSet
	peeks     map[string]childPeek
	writes    map[string][]byte // buffered writes; nil value deletes
	// prefetched holds keys as etcd held them at rev, handed over by the
	// lost commit this transaction retries; a read takes them from here
	// instead of asking etcd.
	prefetched map[string]*mvccpb.KeyValue
	// blocks is how many ID blocks had been reserved, once a transaction
	// that raised the floor has read it (blocksRead).
	blocks     uint64
	blocksRead bool
	// writeOrder lists the keys of writes in order, from the first
	// writtenAfter on (nil until then); write keeps it up to date, so that
	// a walk sees the keys its callback writes.
	writeOrder []string
	// wantChildren holds the names whose children check was announced, to
	// be read along with their records.
	wantChildren map[string]bool
}

// etcdMaxName is the longest name the etcd engine looks up; a longer one is
// absent without a request. This package writes no name over MaxNameSize,
// so only a hand-written key is longer; up to this bound such a record is
// still read and removed: Remove's transaction holds the name at most eight
// bytes for one (its key twice, the children range of its escaped name,
// up to three bytes for one, twice) and its parent's escaped name once,
// under 1 MiB in all, within etcd's default request limit of 1.5 MiB.
const etcdMaxName = 64 << 10

func (t *etcdTx) maxName() int { return etcdMaxName }

func (t *etcdTx) willCheckChildren(name string) {
	if t.wantChildren == nil {
		t.wantChildren = map[string]bool{}
	}
	t.wantChildren[name] = true
}

func (t *etcdTx) readOpts(opts ...clientv3.OpOption) []clientv3.OpOption {
	if t.rev != 0 {
		opts = append(opts, clientv3.WithRev(t.rev))
	}
	return opts
}

// pinRevision makes the first read's revision the transaction's.
func (t *etcdTx) pinRevision(rev int64) {
	if t.rev == 0 {
		t.rev = rev
	}
}

// get reads the whole record: its answer depends on labels, times and
// usage too.
func (t *etcdTx) get(ctx context.Context, name string) (*record, error) {
	rs, err := t.records(ctx, lookupNames{name}, true)
	return rs[0], err
}

// getMany reads identities only, guarded as such (see etcd_guard.go).
func (t *etcdTx) getMany(ctx context.Context, names lookupNames) ([maxLookup]*record, error) {
	return t.records(ctx, names, false)
}

// records returns the records of names as the transaction sees them, and
// notes each read, whole or for identity only, in the read set.
func (t *etcdTx) records(ctx context.Context, names lookupNames, whole bool) ([maxLookup]*record, error) {
	var out [maxLookup]*record
	var fetch []int
	for i, name := range names {
		if name == "" {
			continue
		}
		k := t.keys.snapshot(name)
		if v, ok := t.writes[k]; ok {
			if v == nil {
				continue
			}
			r, err := decodeRecord(v)
			if err != nil {
				return out, err
			}
			out[i] = r
			continue
		}
		value, known := t.known(k, whole)
		if !known {
			fetch = append(fetch, i)
			continue
		}
		if value != nil {
			r, err := decodeRecord(value)
			if err != nil {
				return out, fmt.Errorf("snapshot %q: %w", name, err)
			}
			out[i] = r
		}
	}
	if len(fetch) == 0 {
		return out, nil
	}
	// One request for every record, and for the children of any name whose
	// children check was announced, so that Remove costs one round trip.
	type read struct {
		name     string
		children bool
	}
	var reads []read
	var ops []clientv3.Op
	asked := map[string]bool{}
	for _, i := range fetch {
		if asked[names[i]] {
			continue // the same name twice, as CommitActive(key, key)
		}
		asked[names[i]] = true
		reads = append(reads, read{names[i], false})
		ops = append(ops, clientv3.OpGet(t.keys.snapshot(names[i]), t.readOpts()...))
		if t.wantChildren[names[i]] {
			reads = append(reads, read{names[i], true})
			ops = append(ops, clientv3.OpGet(t.keys.childPrefix(names[i]),
				t.readOpts(clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(1))...))
		}
	}
	results, err := t.readMany(ctx, ops)
	if err != nil {
		return out, err
	}
	for j, rd := range reads {
		rr := results[j]
		if rd.children {
			t.peek(rd.name, rr.Kvs, rr.More)
			continue
		}
		var kv *mvccpb.KeyValue
		if len(rr.Kvs) > 0 {
			kv = rr.Kvs[0]
			r, err := decodeRecord(kv.Value)
			if err != nil {
				return out, fmt.Errorf("snapshot %q: %w", rd.name, err)
			}
			for _, i := range fetch {
				if names[i] == rd.name {
					out[i] = r
				}
			}
		}
		t.reads.note(t.keys.snapshot(rd.name), readOf(kv), whole)
	}
	return out, nil
}

// known returns the value of key at the read revision when the transaction
// read it already or was handed it by the lost commit it retries, and
// notes the read; known is false when etcd must be asked.
func (t *etcdTx) known(key string, whole bool) (value []byte, known bool) {
	if r, ok := t.reads[key]; ok {
		t.reads.note(key, r, whole)
		return r.value, true
	}
	kv, ok := t.prefetched[key]
	if !ok {
		return nil, false
	}
	r := readOf(kv)
	t.reads.note(key, r, whole)
	return r.value, true
}

// readMany sends reads in one round trip: a plain Get for one (cheaper for
// etcd than a transaction), a Txn of Gets for more, which etcd answers at
// one revision. The first read's revision becomes the transaction's.
func (t *etcdTx) readMany(ctx context.Context, ops []clientv3.Op) ([]*etcdserverpb.RangeResponse, error) {
	if t.e.cache != nil && !t.copyChosen {
		if err := t.readFromCopy(ctx, 0); err != nil {
			return nil, err
		}
	}
	if t.snap != nil {
		return t.readCopy(ops)
	}
	if len(ops) == 1 {
		var resp clientv3.OpResponse
		err := t.e.call(ctx, func(ctx context.Context) (err error) {
			resp, err = t.e.kv.Do(ctx, ops[0])
			return err
		})
		if err != nil {
			return nil, err
		}
		get := resp.Get()
		t.pinRevision(get.Header.Revision)
		return []*etcdserverpb.RangeResponse{(*etcdserverpb.RangeResponse)(get)}, nil
	}
	var resp *clientv3.TxnResponse
	err := t.e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = t.e.kv.Txn(ctx).Then(ops...).Commit()
		return err
	})
	if err != nil {
		return nil, err
	}
	t.pinRevision(resp.Header.Revision)
	out := make([]*etcdserverpb.RangeResponse, len(resp.Responses))
	for i, r := range resp.Responses {
		out[i] = r.GetResponseRange()
	}
	return out, nil
}

// readOne is readMany of one request.
func (t *etcdTx) readOne(ctx context.Context, op clientv3.Op) (*etcdserverpb.RangeResponse, error) {
	out, err := t.readMany(ctx, []clientv3.Op{op})
	if err != nil {
		return nil, err
	}
	return out[0], nil
}

func (t *etcdTx) peek(name string, kvs []*mvccpb.KeyValue, more bool) {
	if t.peeks == nil {
		t.peeks = map[string]childPeek{}
	}
	t.peeks[name] = childPeek{keys: kvs, more: more}
}

func (t *etcdTx) write(key string, value []byte) {
	if t.writes == nil {
		t.writes = map[string][]byte{}
	}
	if _, ok := t.writes[key]; !ok && t.writeOrder != nil {
		i, _ := slices.BinarySearch(t.writeOrder, key)
		t.writeOrder = slices.Insert(t.writeOrder, i, key)
	}
	t.writes[key] = value
}

// writtenAfter returns the first key in (after, end) that the transaction
// has written or deleted, among its writes as they are now.
func (t *etcdTx) writtenAfter(after, end string) (string, bool) {
	if t.writeOrder == nil {
		// Sorted once, when a walk first asks; write keeps the order from
		// then on, so transactions that never walk never sort.
		t.writeOrder = slices.AppendSeq(make([]string, 0, len(t.writes)), maps.Keys(t.writes))
		slices.Sort(t.writeOrder)
	}
	i, found := slices.BinarySearch(t.writeOrder, after)
	if found {
		i++
	}
	if i < len(t.writeOrder) && t.writeOrder[i] < end {
		return t.writeOrder[i], true
	}
	return "", false
}

func (t *etcdTx) put(name string, r *record) error {
	k := t.keys.snapshot(name)
	if v, written := t.writes[k]; written && v == nil && t.reads[k].createRev != 0 {
		// A new record where a stored one was removed in this transaction.
		t.write(t.keys.markers.replaced, []byte{})
	}
	t.write(k, encodeRecord(r))
	return nil
}

func (t *etcdTx) delete(name string) error {
	k := t.keys.snapshot(name)
	// Deleting leaves no key for a range compare to see; touching a marker,
	// which lies in the range a walk guards, makes walkers conflict, and
	// merged guards see it too (see etcd_guard.go). A record that exists
	// only in this transaction was seen by nobody else and needs none.
	if r, read := t.reads[k]; !read {
		t.write(t.keys.markers.committed, []byte{})
		t.write(t.keys.markers.others, []byte{})
	} else if r.createRev != 0 {
		t.write(t.keys.markers.forKind(kindOfValue(r.value)), []byte{})
	}
	t.write(k, nil)
	return nil
}

func (t *etcdTx) link(parent, child ref) error {
	t.write(t.keys.child(parent.name, child.id), []byte(child.name))
	return nil
}

func (t *etcdTx) unlink(parent, child ref) error {
	t.write(t.keys.child(parent.name, child.id), nil)
	return nil
}

func (t *etcdTx) hasChildren(ctx context.Context, p ref) (bool, error) {
	prefix := t.keys.childPrefix(p.name)
	deleted := map[string]bool{}
	for k, v := range t.writes {
		if strings.HasPrefix(k, prefix) {
			if v != nil {
				return true, nil
			}
			deleted[k] = true
		}
	}
	peek, ok := t.peeks[p.name]
	for {
		if !ok || (peek.more && len(peek.keys) <= len(deleted)) {
			limit := int64(len(deleted) + 1)
			resp, err := t.readOne(ctx, clientv3.OpGet(prefix, t.readOpts(clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(limit))...))
			if err != nil {
				return false, err
			}
			t.peek(p.name, resp.Kvs, resp.More)
			peek, ok = t.peeks[p.name], true
		}
		for _, kv := range peek.keys {
			if !deleted[string(kv.Key)] {
				// Guard the child we saw: the answer holds while it lives
				// (relinking it on its commit does not matter).
				t.reads.note(string(kv.Key), readOf(kv), false)
				return true, nil
			}
		}
		if !peek.more {
			// Guard the whole prefix: a child added since rev conflicts.
			t.readRange(prefix, clientv3.GetPrefixRangeEnd(prefix))
			return false, nil
		}
		ok = false
	}
}

func (t *etcdTx) readRange(start, end string) {
	if t.ranges == nil {
		t.ranges = rangeSet{}
	}
	t.ranges[start] = end
}

// scan merges the stored snapshots, read in pages at the transaction's
// revision, with the transaction's buffered writes. fn may write: the writes
// are looked up afresh at every step, so each name is reported as the
// transaction holds it when the walk reaches it. A name written ahead of the
// walk is visited with its new record, one deleted ahead of it is not, and
// one written behind it is not visited (again).
func (t *etcdTx) scan(ctx context.Context, fn func(name string, r *record, err error) error) error {
	start, end := t.keys.snapshotRange()
	// The guard starts at the deletion marker, which sorts just before the
	// snapshots, so removals conflict with this walk too.
	t.readRange(t.keys.markers.committed, end)

	// No snapshot's key is start itself (that would be the empty name, which
	// is never written), so every written one lies after it.
	w := &etcdWalk{t: t, prefix: start, after: start, fn: fn}
	err := t.scanRange(ctx, start, end, func(kv *mvccpb.KeyValue) error {
		key := string(kv.Key)
		if err := w.writtenBefore(key); err != nil {
			return err
		}
		return w.reachStored(key, kv.Value)
	})
	if err != nil {
		return err
	}
	return w.writtenBefore(end)
}

// etcdWalk is the position of one scan in the snapshots range: every key up
// to after has been reached, none after it.
type etcdWalk struct {
	t      *etcdTx
	prefix string // of every key, cut off to give the name
	after  string // the last key reached
	fn     func(name string, r *record, err error) error
}

// writtenBefore reaches, in order, the keys before limit that the
// transaction has written and the walk has not reached yet. Each reach may
// write, so the next key is looked up after it.
func (w *etcdWalk) writtenBefore(limit string) error {
	for {
		key, ok := w.t.writtenAfter(w.after, limit)
		if !ok {
			return nil
		}
		if err := w.reachWritten(key); err != nil {
			return err
		}
	}
}

// reachStored reaches a key etcd held at the read revision; a write of the
// transaction replaces (or deletes) what etcd holds. Like reachWritten, it
// moves the position before fn runs, since fn may write.
func (w *etcdWalk) reachStored(key string, value []byte) error {
	if _, mine := w.t.writes[key]; mine {
		return w.reachWritten(key)
	}
	w.after = key
	return w.report(key, value)
}

// reachWritten reaches a key the transaction has written; a deleted one is
// passed over.
func (w *etcdWalk) reachWritten(key string) error {
	w.after = key
	value := w.t.writes[key]
	if value == nil {
		return nil
	}
	return w.report(key, value)
}

// report hands fn the record of key, or the error decoding it.
func (w *etcdWalk) report(key string, value []byte) error {
	r, err := decodeRecord(value)
	return w.fn(key[len(w.prefix):], r, err)
}

// layoutDamage is always nil: every key of the etcd layout is a record or
// an index entry of its own, whose damage scan and scanLinks report.
func (t *etcdTx) layoutDamage() error { return nil }

func (t *etcdTx) scanLinks(ctx context.Context, fn func(parent, child ref, err error) error) error {
	start, end := t.keys.childrenRange()
	t.readRange(start, end)
	return t.scanRange(ctx, start, end, func(kv *mvccpb.KeyValue) error {
		rest := string(kv.Key[len(start):])
		i := strings.LastIndexByte(rest, '/')
		var parent string
		var child uint64
		ok := i >= 0
		if ok {
			var err error
			parent, ok = unescapeName(rest[:i])
			child, err = strconv.ParseUint(rest[i+1:], 10, 64)
			// Only the key link writes is one: "07" would outlive unlink.
			ok = ok && err == nil && formatID(child) == rest[i+1:]
		}
		if !ok {
			return fn(ref{}, ref{name: string(kv.Value)}, fmt.Errorf("children key %q is not a link's: %w", kv.Key, ErrCorrupt))
		}
		return fn(ref{name: parent}, ref{name: string(kv.Value), id: child}, nil)
	})
}

// readRecords reads the records of names as etcd holds them at the read
// revision (see checkKeys), noting none of them.
func (t *etcdTx) readRecords(ctx context.Context, names []string, fn func(int, *record, error)) error {
	return t.checkKeys(ctx, len(names), func(i int) string { return t.keys.snapshot(names[i]) }, func(i int, kv *mvccpb.KeyValue) {
		if kv == nil {
			fn(i, nil, nil)
			return
		}
		r, err := decodeRecord(kv.Value)
		fn(i, r, err)
	})
}

// indexedParent: etcd keys the index by the parent's name.
func (t *etcdTx) indexedParent(name string, _ uint64) ref { return ref{name: name} }

func (t *etcdTx) readLinks(ctx context.Context, links []link, fn func(int, ref, string, bool)) error {
	return t.checkKeys(ctx, len(links), func(i int) string { return t.keys.child(links[i].parent.name, links[i].child.id) }, func(i int, kv *mvccpb.KeyValue) {
		keyed := t.indexedParent(links[i].parent.name, links[i].parent.id)
		if kv == nil {
			fn(i, keyed, "", false)
			return
		}
		fn(i, keyed, string(kv.Value), true)
	})
}

// checkTxnKeyBytes bounds the keys of one Txn of checkKeys: etcd refuses
// a request over 1.5 MiB (its default --max-request-bytes), and a name may
// be up to etcdMaxName long, three times that escaped.
const checkTxnKeyBytes = 1 << 20

// checkKeys reads n keys at the read revision, in Txns of up to
// maxTxnOps Gets and checkTxnKeyBytes of keys, and hands each to fn (nil:
// absent).
func (t *etcdTx) checkKeys(ctx context.Context, n int, key func(i int) string, fn func(i int, kv *mvccpb.KeyValue)) error {
	perTxn := max(t.e.opts.maxTxnOps, 1)
	for start := 0; start < n; {
		var ops []clientv3.Op
		for size := 0; start+len(ops) < n && len(ops) < perTxn; {
			k := key(start + len(ops))
			if size += len(k); size > checkTxnKeyBytes && len(ops) > 0 {
				break
			}
			ops = append(ops, clientv3.OpGet(k, t.readOpts()...))
		}
		results, err := t.readMany(ctx, ops)
		if err != nil {
			return err
		}
		for j, rr := range results {
			var kv *mvccpb.KeyValue
			if len(rr.Kvs) > 0 {
				kv = rr.Kvs[0]
			}
			fn(start+j, kv)
		}
		start += len(ops)
	}
	return nil
}

// streamAfterPages is how many pages' worth of keys may remain after a
// page before scanRange streams them instead.
const streamAfterPages = 8

// scanRange reads [start, end) from etcd at the transaction's revision: in
// pages, or, when more than streamAfterPages pages remain after the first
// and the server offers it (etcd 3.7 and later), the rest in one stream.
// etcd counts the whole rest of the range for every page it answers, so
// paging alone costs time in the square of the range's length; the stream
// keeps it in proportion, with memory still bounded by a chunk. It neither
// sees buffered writes nor guards the range: callers do.
func (t *etcdTx) scanRange(ctx context.Context, start, end string, fn func(kv *mvccpb.KeyValue) error) error {
	for from := start; ; {
		resp, err := t.readOne(ctx, clientv3.OpGet(from, t.readOpts(clientv3.WithRange(end), clientv3.WithLimit(t.e.opts.pageSize))...))
		if err != nil {
			return err
		}
		for _, kv := range resp.Kvs {
			if err := fn(kv); err != nil {
				return err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
		// Count is what the range held from this page on.
		if resp.Count-int64(len(resp.Kvs)) > streamAfterPages*t.e.opts.pageSize && !t.e.noStream.Load() {
			err := t.streamRange(ctx, from, end, fn)
			if !errors.Is(err, errNoStream) {
				return err
			}
			t.e.noStream.Store(true)
		}
	}
}

// errNoStream: the server (older than etcd 3.7) or a KV wrapper does not
// offer RangeStream.
var errNoStream = errors.New("etcd offers no range stream")

// streamRange reads [from, end) in one RangeStream at the transaction's
// revision, which a page read pinned before. The request timeout bounds
// each wait for a chunk, not the whole stream nor fn. It returns
// errNoStream, having called fn for nothing, when the stream is not
// offered.
func (t *etcdTx) streamRange(ctx context.Context, from, end string, fn func(kv *mvccpb.KeyValue) error) error {
	if t.e.closed.Load() {
		return ErrClosed
	}
	sctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	ch, err := t.e.kv.GetStream(sctx, from, t.readOpts(clientv3.WithRange(end))...)
	if err != nil {
		return t.e.streamErr(sctx, err)
	}
	defer func() {
		cancel(nil)
		// The client's goroutine ends once its last send is taken.
		for range ch {
		}
	}()
	timeout := t.e.opts.requestTimeout
	var timer *time.Timer
	if timeout > 0 {
		timer = time.AfterFunc(timeout, func() { cancel(errRequestTimeout) })
		defer timer.Stop()
	}
	for {
		if timer != nil {
			timer.Reset(timeout)
		}
		r, ok := <-ch
		if timer != nil {
			timer.Stop()
		}
		if !ok {
			return nil
		}
		if err := r.Err(); err != nil {
			return t.e.streamErr(sctx, err)
		}
		if t.e.closed.Load() {
			return ErrClosed
		}
		for _, kv := range r.Kvs {
			if err := fn(kv); err != nil {
				return err
			}
		}
	}
}

// streamErr maps an error of streamRange as call does.
func (e *etcdEngine) streamErr(sctx context.Context, err error) error {
	switch {
	case status.Code(err) == codes.Unimplemented:
		return fmt.Errorf("%w: %w", errNoStream, err)
	case context.Cause(sctx) == errRequestTimeout:
		return fmt.Errorf("etcd did not answer within %v: %w: %w", e.opts.requestTimeout, errdefs.ErrUnavailable, err)
	}
	return mapEtcdErr(err)
}

func (t *etcdTx) rollback() error {
	t.writes, t.writeOrder, t.reads, t.ranges, t.peeks, t.prefetched = nil, nil, nil, nil, nil, nil
	return nil
}

// commit sends one Txn: the guards of every read, then every write. A
// transaction without writes sends nothing, unless it read a copy of the
// watch cache that must be confirmed (see etcdTx.unconfirmed).
func (t *etcdTx) commit(ctx context.Context) error {
	if len(t.writes) == 0 && !t.unconfirmed() {
		return nil
	}
	return t.send(ctx, true)
}

// send sends one Txn: the guards of every read, then, withWrites, every
// write. When the guards fail, its Else branch reads the point reads again,
// for the retry (see lostCommit).
func (t *etcdTx) send(ctx context.Context, withWrites bool) error {
	limit := t.e.opts.maxTxnOps
	var ops []clientv3.Op
	if withWrites {
		for _, k := range slices.Sorted(maps.Keys(t.writes)) {
			if v := t.writes[k]; v != nil {
				ops = append(ops, clientv3.OpPut(k, string(v)))
			} else {
				ops = append(ops, clientv3.OpDelete(k))
			}
		}
	}
	if len(ops) > limit {
		return fmt.Errorf("%d writes, etcd accepts %d per transaction: %w", len(ops), limit, ErrTooLarge)
	}
	host := t.e.host
	budget := limit
	if host.fenced() {
		if host.expired.Load() {
			return fmt.Errorf("host %q: %w", host.name, ErrHostExpired)
		}
		budget-- // for the fence
	}
	// A store without host scopes writes only while the root is not
	// host-scoped: a root may become so after the store's first
	// transaction checked (checkUnscoped), when it held no snapshots. The
	// mode compare takes one of the compares etcd accepts; a transaction
	// whose reads need every one of them (only with a tiny --max-txn-ops)
	// goes without it rather than fail.
	unscoped := t.e.opts.host == ""
	var cmps []clientv3.Cmp
	var err error
	if unscoped {
		cmps, err = guards(t.reads, t.ranges, t.rev, budget-1, t.keys.snapshot(""), t.keys.markers)
		if err == nil {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(t.e.keys.mode()), "=", 0))
			budget--
		} else {
			unscoped = false
		}
	}
	if !unscoped {
		cmps, err = guards(t.reads, t.ranges, t.rev, budget, t.keys.snapshot(""), t.keys.markers)
	}
	if err != nil {
		return err
	}
	floorKey := t.keys.idFloor
	_, guardsFloor := t.reads[floorKey]
	refetched, refetch := refetchOps(t.reads, floorKey, budget)
	if host.fenced() {
		// The lock key keeps the revision this store put it at while the
		// lease lives; its expiry deletes it.
		lock := t.keys.lock(host.name)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(lock), "=", host.lockRev))
		refetch = append(refetch, clientv3.OpGet(lock))
	}
	if unscoped {
		refetch = append(refetch, clientv3.OpGet(t.e.keys.mode()))
	}
	var resp *clientv3.TxnResponse
	err = t.e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = t.e.kv.Txn(ctx).If(cmps...).Then(ops...).Else(refetch...).Commit()
		return err
	})
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		if unscoped && len(resp.Responses[len(resp.Responses)-1].GetResponseRange().GetKvs()) > 0 {
			t.e.unscopedChecked.Store(false)
			return fmt.Errorf("etcd root %q has become host-scoped: open it with a host identity: %w", t.e.root, ErrScopeMismatch)
		}
		if host.fenced() {
			kvs := resp.Responses[len(resp.Responses)-1].GetResponseRange().GetKvs()
			if len(kvs) == 0 || kvs[0].ModRevision != host.lockRev {
				host.expired.Store(true)
				return fmt.Errorf("host %q: %w", host.name, ErrHostExpired)
			}
		}
		lost := &lostCommit{e: t.e, rev: resp.Header.Revision, read: t.rev, kvs: map[string]*mvccpb.KeyValue{}}
		for i, k := range refetched {
			var kv *mvccpb.KeyValue
			if kvs := resp.Responses[i].GetResponseRange().GetKvs(); len(kvs) > 0 {
				kv = kvs[0]
			}
			lost.kvs[k] = kv
		}
		if guardsFloor {
			// Tells whether the floor is why.
			t.e.dropStaleIDBlock(readOf(lost.kvs[floorKey]).modRev, resp.Header.Revision)
		}
		return lost
	}
	if len(ops) > 0 {
		t.e.noteWrite(resp.Header.Revision)
		if t.e.cache != nil {
			t.e.cache.applyOwn(resp.Header.Revision, t.writes)
		}
	}
	if v, raised := t.writes[floorKey]; withWrites && raised && v != nil {
		// This commit raised the floor: the floor key now has its revision.
		t.e.dropStaleIDBlock(resp.Header.Revision, resp.Header.Revision)
	}
	return nil
}
