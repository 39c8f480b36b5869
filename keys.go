package storage

// Layout of the bbolt engine: byte for byte containerd's, so a driver's
// existing metadata.db opens unchanged and a file written here opens in
// containerd.
//
//	v1/                                  bucket KeyVersion
//	  snapshots/                         bucket KeySnapshots, sequence = last ID
//	    <name>/                          bucket, one per snapshot
//	      id         uvarint ID
//	      kind       one byte, snapshots.Kind
//	      parent     parent name (absent without a parent)
//	      createdat  time.Time.MarshalBinary, UTC
//	      updatedat  time.Time.MarshalBinary, UTC
//	      labels/    bucket of label key -> value (absent without labels)
//	      inodes     varint, committed snapshots only
//	      size       varint, committed snapshots only
//	      parentids  uvarint chain of parent IDs, immediate parent first
//	                 (our addition: containerd ignores it; when absent the
//	                 chain is followed through the parents), for chains of
//	                 up to 128 IDs
//	      chainpiece deeper chains: the name of the ancestor whose
//	                 chainpiece or parentids goes on where this one stops
//	                 (uvarint length, bytes), then the first IDs of the
//	                 chain, at most 32 (see bolt_chain.go; containerd
//	                 ignores it)
//	  parents/                           bucket KeyParents
//	    <uvarint parent ID> 0x00 <uvarint child ID> -> child name
//
// IDs come from the snapshots bucket's sequence, as in containerd: unique in
// the file, and never handed out again once committed, even after a
// Remove (a rollback gives back the IDs its transaction drew, as in
// containerd). They never wrap: at a sequence of 2^64-1 the
// allocator is exhausted (ErrIDsExhausted), where containerd's would hand
// out 0.
const (
	KeyVersion   = "v1"
	KeySnapshots = "snapshots"
	KeyParents   = "parents"

	KeyID        = "id"
	KeyKind      = "kind"
	KeyParent    = "parent"
	KeyCreatedAt = "createdat"
	KeyUpdatedAt = "updatedat"
	KeyLabels    = "labels"
	KeyInodes    = "inodes"
	KeySize      = "size"
	KeyParentIDs = "parentids"
	// KeyChainPiece holds a parent chain deeper than 128 in pieces
	// (bolt_chain.go).
	KeyChainPiece = "chainpiece"
)

// Layout of the etcd engine, under the key prefix <root>/storage.v1/ (a root
// may hold any bytes but no "/"-separated element "storage.v1", so no root
// reaches into another's keys; roots "a", "a/b" and "ab" are disjoint):
//
//	snapshots/<name>                  record of one snapshot (name verbatim)
//	snapshots                         deletion marker of committed records,
//	                                  rewritten by their removal
//	snapshots.active                  deletion marker of actives and views
//	                                  (KeyEtcdOthersRemoved)
//	snapshots.replaced                rewritten by a commit that removes a
//	                                  record and stores another under its
//	                                  name (KeyEtcdReplaced)
//	children/<escaped parent>/<child ID> -> child name
//	ids/block                         its version numbers the ID blocks
//	ids/floor                         decimal; IDs start above it (imports)
//
// The markers exist because etcd's range compares cannot see a deleted key:
// a walk guards the range from "snapshots" to the end of the records, which
// holds all three, and guards merged past --max-txn-ops watch the marker of
// the kinds they read (see etcd_guard.go). Stores written before the second
// and third markers existed (every removal then rewrote "snapshots") open
// unchanged, with no upgrade step: the markers are optional, and an old
// client's removals touch "snapshots", which a new client's guards of
// committed records watch and a new client's walks cover. Check reads the
// records and the index only, so it knows both.
//
// A record is versioned binary (see encodeRecord): ID, kind, parent name,
// parent ID chain (immediate parent first), labels, created, updated,
// usage. In the children index the parent name is percent-escaped ('%' and
// '/') so it is one path element and no name reaches another's children.
//
// IDs: a store reserves a block of 128 IDs at a time by putting ids/block
// and reading, in the same etcd Txn (one round trip), the version it
// replaced and ids/floor: block v is floor + v*128 + 1 ... floor +
// (v+1)*128, with the floor that Txn read. The floor only rises and v only
// grows, so blocks never overlap; IDs are never reused (unused ones of a
// block are skipped, also when a store restarts), and only one create in 128
// touches ids/block. The block size is part of the layout: every client of
// a root uses it. IDs never wrap: the block reaching 2^64-1 ends there, and
// a reservation past it fails with ErrIDsExhausted (it still counts as a
// block, so the allocator's limit, floor + blocks*128, saturates at 2^64-1).
//
// A raised floor (Import, RaiseIDs) must also stop blocks reserved before
// it: the commit of a transaction that took IDs of a block compares the mod
// revision of ids/floor with the one the reservation read. After a raise,
// each other client's next such commit conflicts once (WithTransaction runs
// it again), and the client reserves a new block above the floor; on a
// conflict the Txn reads ids/floor, so that a conflict over anything else
// keeps the block. The cost: one compare per commit that created snapshots,
// and one retry per client holding a block, per raise.
//
// A transaction that raised the floor cannot reserve a block above a floor
// not yet committed. It hands out the ID right above floor + (blocks
// reserved)*128 instead, raising the floor by one with each, and guards
// ids/block (read once, one round trip), so that a block reserved meanwhile
// makes it conflict.
//
// Host scopes (see hosts.go). A root opened WithHost keeps each host's
// records apart, and shares the ID allocator and the shared layers:
//
//	mode                              "hosts": the root is host-scoped
//	                                  (absent: it is not)
//	hosts/<host>                      the host, since it first opened the
//	                                  root (decimal Unix seconds)
//	hosts/<host>/lock                 KeyLock: held by the lease of the open
//	                                  store of the host, the lease ID in
//	                                  decimal; absent while no store of the
//	                                  host is alive
//	scopes/<host>/snapshots/<name>    the host's records, and its deletion
//	scopes/<host>/snapshots...        markers and children index, laid out
//	scopes/<host>/children/...        as the root's are without scopes
//	layers/<ID>                       a shared layer: content key, parent
//	                                  chain, usage and its references, one
//	                                  per binding (host and name)
//	content/<escaped key>/<ID>        index of shared layers by content
//	                                  key -> uvarint parent ID (0: none)
//
// Host names are 1 to 128 bytes of letters, digits and ".-_:", so they are
// one path element. A binding's record is version 2 (encodeRecord): a
// version 1 record followed by its content key.
const (
	KeyEtcdVersion   = "storage.v1"
	KeyEtcdSnapshots = "snapshots"
	// KeyEtcdOthersRemoved is the deletion marker of actives and views
	// (KeyEtcdSnapshots is that of committed snapshots).
	KeyEtcdOthersRemoved = "snapshots.active"
	// KeyEtcdReplaced is touched by a commit that removes a snapshot and
	// stores another under its name.
	KeyEtcdReplaced = "snapshots.replaced"
	KeyEtcdChildren = "children"
	KeyEtcdIDBlock  = "ids/block"
	KeyEtcdIDFloor  = "ids/floor"

	KeyEtcdMode    = "mode"
	KeyEtcdHosts   = "hosts"
	KeyEtcdScopes  = "scopes"
	KeyEtcdLayers  = "layers"
	KeyEtcdContent = "content"
	// KeyLock is the key, under a host's entry, that the host's lease
	// holds while the host is alive: it names who owns the host's active
	// snapshots and whether that owner lives.
	KeyLock = "lock"
	// KeyUpperdir is the label in which a driver records where an active
	// snapshot's writable layer lives, so that a host taking it over finds
	// it: containerd's convention for overlay snapshotters.
	KeyUpperdir = "containerd.io/snapshot/overlay.upperdir"
)
