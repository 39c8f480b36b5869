package storage

import (
	"context"
	"fmt"
	"math"
	"math/bits"
	"strconv"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// etcdIDBlock is a reserved block of IDs: left of them, from next on.
type etcdIDBlock struct {
	next, left uint64
	// floor is the ID floor key as the reservation read it (modRev 0:
	// absent). A transaction that takes an ID of the block guards the floor
	// key with it, so the commit conflicts once the floor has been raised,
	// and the block, which may lie below the new floor, is dropped.
	floor keyRead
	// reservedAt is the revision of the reservation.
	reservedAt int64
}

// etcdIDBlockSize is how many IDs a store reserves at a time. It is part of
// the layout: every client of a root must use the same size, or blocks
// would overlap.
const etcdIDBlockSize = 128

// reserveIDs takes a new block of IDs from the shared allocator in one round
// trip: the version of the block key numbers the blocks, the floor key
// (raised by imports) offsets them, both read in the same etcd Txn. See
// keys.go.
func (e *etcdEngine) reserveIDs(ctx context.Context) (etcdIDBlock, error) {
	var resp *clientv3.TxnResponse
	err := e.call(ctx, func(ctx context.Context) (err error) {
		resp, err = e.kv.Txn(ctx).Then(
			clientv3.OpPut(e.keys.idBlock, "", clientv3.WithPrevKV()),
			clientv3.OpGet(e.keys.idFloor),
		).Commit()
		return err
	})
	if err != nil {
		return etcdIDBlock{}, err
	}
	var block uint64
	if prev := resp.Responses[0].GetResponsePut().GetPrevKv(); prev != nil {
		block = uint64(prev.Version)
	}
	b := etcdIDBlock{reservedAt: resp.Header.Revision, floor: keyRead{whole: true}}
	if kvs := resp.Responses[1].GetResponseRange().GetKvs(); len(kvs) > 0 {
		b.floor = keyRead{createRev: kvs[0].CreateRevision, modRev: kvs[0].ModRevision, value: kvs[0].Value, whole: true}
	}
	floor, err := parseIDFloor(b.floor.value)
	if err != nil {
		return etcdIDBlock{}, err
	}
	base := etcdIDLimit(floor, block)
	if base == math.MaxUint64 {
		return etcdIDBlock{}, ErrIDsExhausted
	}
	// The block at the top of the ID space ends at 2^64-1.
	b.next, b.left = base+1, min(etcdIDBlockSize, math.MaxUint64-base)
	return b, nil
}

// parseIDFloor reads the floor key's value; nil is no floor.
func parseIDFloor(v []byte) (uint64, error) {
	if v == nil {
		return 0, nil
	}
	floor, err := strconv.ParseUint(string(v), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("ID floor %q: %w", v, ErrCorrupt)
	}
	return floor, nil
}

// etcdIDLimit is the highest ID blocks blocks above floor hold, saturated at
// 2^64-1: IDs never wrap, and a limit of 2^64-1 leaves no ID to hand out.
func etcdIDLimit(floor, blocks uint64) uint64 {
	hi, span := bits.Mul64(blocks, etcdIDBlockSize)
	limit, carry := bits.Add64(floor, span, 0)
	if hi != 0 || carry != 0 {
		return math.MaxUint64
	}
	return limit
}

// takeID hands out the next ID of the store's block, with the floor key
// the block was reserved under. A new block is reserved when there is none
// left, or when the block's floor is older than minFloorRev, the floor key's
// mod revision as the calling transaction saw it: the floor was raised since
// the reservation.
func (e *etcdEngine) takeID(ctx context.Context, minFloorRev int64) (uint64, keyRead, error) {
	e.idMu.Lock()
	defer e.idMu.Unlock()
	if e.ids.left == 0 || e.ids.floor.modRev < minFloorRev {
		b, err := e.reserveIDs(ctx)
		if err != nil {
			return 0, keyRead{}, err
		}
		e.ids = b
	}
	id := e.ids.next
	e.ids.left--
	if e.ids.left > 0 {
		e.ids.next++
	}
	return id, e.ids.floor, nil
}

// dropStaleIDBlock forgets the store's block when it was reserved no later
// than revision rev and under another floor than the one etcd held at rev
// (mod revision floorModRev): the floor was raised since, and the block may
// lie below it. Any other block is kept, so a conflict over something else
// costs no block.
func (e *etcdEngine) dropStaleIDBlock(floorModRev, rev int64) {
	e.idMu.Lock()
	defer e.idMu.Unlock()
	if e.ids.reservedAt <= rev && e.ids.floor.modRev != floorModRev {
		e.ids = etcdIDBlock{}
	}
}

func (t *etcdTx) idLimit(ctx context.Context) (uint64, error) {
	rs, err := t.readMany(ctx, []clientv3.Op{
		clientv3.OpGet(t.e.keys.idBlock, t.readOpts()...),
		clientv3.OpGet(t.e.keys.idFloor, t.readOpts()...),
	})
	if err != nil {
		return 0, err
	}
	var blocks uint64
	var floorValue []byte
	if kvs := rs[0].Kvs; len(kvs) > 0 {
		blocks = uint64(kvs[0].Version)
	}
	if kvs := rs[1].Kvs; len(kvs) > 0 {
		floorValue = kvs[0].Value
	}
	// A floor raised in this transaction (and the IDs taken above it)
	// count too.
	if v, raised := t.writes[t.e.keys.idFloor]; raised {
		floorValue = v
		blocks = max(blocks, t.blocks)
	}
	floor, err := parseIDFloor(floorValue)
	if err != nil {
		return 0, err
	}
	return etcdIDLimit(floor, blocks), nil
}

// nextID takes an ID of the store's block and guards the floor key with
// the floor the block was reserved under (see etcdIDBlock). In a
// transaction that raised the floor, the ID comes from above it instead.
func (t *etcdTx) nextID(ctx context.Context) (uint64, error) {
	k := t.e.keys.idFloor
	if v, raised := t.writes[k]; raised {
		return t.nextIDAboveRaisedFloor(ctx, v)
	}
	seen, guarded := t.reads[k]
	id, floor, err := t.e.takeID(ctx, seen.modRev)
	if err != nil {
		return 0, err
	}
	if guarded && floor.modRev != seen.modRev {
		// The floor was raised after this transaction read it (or took an
		// earlier ID): its commit could only conflict.
		return 0, fmt.Errorf("ID floor raised during the transaction: %w", ErrConflict)
	}
	t.reads[k] = floor
	return id, nil
}

// nextIDAboveRaisedFloor hands out an ID in a transaction that raised the
// floor to pending. The store's block may lie below the new floor, and no
// block can be reserved above a floor not yet committed; so the ID is the
// one right above everything the allocator may have handed out (the raised
// floor plus every block reserved), and the floor rises by one to cover it.
// The block key is guarded: a block reserved meanwhile by any client makes
// the commit conflict.
func (t *etcdTx) nextIDAboveRaisedFloor(ctx context.Context, pending []byte) (uint64, error) {
	floor, err := parseIDFloor(pending)
	if err != nil {
		return 0, err
	}
	if !t.blocksRead {
		// Read at the latest revision, not the transaction's: a block this
		// store reserved for an earlier create of the transaction would
		// otherwise fail the guard.
		var resp *clientv3.GetResponse
		err := t.e.call(ctx, func(ctx context.Context) (err error) {
			resp, err = t.e.kv.Get(ctx, t.e.keys.idBlock, clientv3.WithKeysOnly())
			return err
		})
		if err != nil {
			return 0, err
		}
		s := keyRead{whole: true}
		if len(resp.Kvs) > 0 {
			s.modRev, t.blocks = resp.Kvs[0].ModRevision, uint64(resp.Kvs[0].Version)
		}
		t.reads[t.e.keys.idBlock], t.blocksRead = s, true
	}
	limit := etcdIDLimit(floor, t.blocks)
	if limit == math.MaxUint64 {
		return 0, ErrIDsExhausted
	}
	// floor < limit here, so floor+1 does not wrap either.
	t.write(t.e.keys.idFloor, []byte(formatID(floor+1)))
	return limit + 1, nil
}

// raiseIDs raises the floor of the ID blocks (see keys.go) in this
// transaction; the floor read is guarded like any other read. The store's
// block is dropped when the raise commits (see commit); until then the
// transaction takes its IDs above the raised floor (see nextID).
func (t *etcdTx) raiseIDs(ctx context.Context, id uint64) error {
	k := t.e.keys.idFloor
	s, ok := t.reads[k]
	if !ok {
		resp, err := t.readOne(ctx, clientv3.OpGet(k, t.readOpts()...))
		if err != nil {
			return err
		}
		if len(resp.Kvs) > 0 {
			s = readOf(resp.Kvs[0])
		}
		s.whole = true
		t.reads[k] = s
	}
	if v, buffered := t.writes[k]; buffered {
		s.value = v
	}
	floor, err := parseIDFloor(s.value)
	if err != nil {
		return err
	}
	if id > floor {
		t.write(k, []byte(formatID(id)))
	}
	return nil
}
