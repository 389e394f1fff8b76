"""A pure-Python reference model of the engine: plain dicts and integers, written from
DOMAIN.md §2, PROTOCOL.md §3–4 and docs/result-codes.md, not from the Cython code.

It is slow on purpose (obviously correct beats fast here). Property tests run random command
sequences through it and through the Cython engine and compare every result row and balance;
bench/bench_engine.py measures the engine against it.

Retention is unbounded here: tests that compare the two keep the engine's transaction ring
larger than the number of messages.
"""
from dataclasses import dataclass, field

from .config import NodeConfig
from .layouts import Cmd, ReqFlag, ResFlag, CardStatus, CardFlag, rc

AMOUNT_FEN_MAX = 999_999_999_999
VISIT_KIND = {11: 0, 14: 1, 21: 2, 41: 3}
KIND = {"hospital": 1, "pharmacy": 2, "bank": 3, "merchant": 4}
REVERSIBLE = {Cmd.PURCHASE, Cmd.VOID, Cmd.MED_SETTLE, Cmd.MED_CANCEL, Cmd.DEPOSIT, Cmd.WITHDRAW,
              Cmd.TRANSFER}
APPROVED = {rc("00"), rc("10")}


@dataclass
class Card:
    pan_hash: int
    person_hash: int
    ins: int
    fin: int
    region: int              # region code
    ins_type: int            # insurance type code
    retired: int
    status: int
    flags: int
    pvv_bank: int
    pvv_social: int
    expiry_yymm: int
    payer: int = -1          # slot; for a replaced card: its successor
    tries_social: int = 0
    tries_bank: int = 0
    acc_year: int = 0
    ded_used: list = field(default_factory=lambda: [0, 0])
    fund_paid: list = field(default_factory=lambda: [0, 0])
    admissions: list = field(default_factory=lambda: [0, 0])
    temp_loss_until: int = 0
    aid_beneficiaries: int = 0   # 家庭共济: cards bound to this one as their payer (on the live card)


@dataclass
class Entry:
    """A processed message, as the engine keeps it for duplicates, reversals and originals."""
    rrn: int
    idem_key: int
    content_hash: int
    rev_key: int
    cmd: int
    terminal: int
    stan: int
    batch_no: int
    business_date: int
    answer: dict = field(default_factory=dict)
    state: str = "open"      # open, undone, reversed, tombstone
    refunded: int = 0


def blank_result(q, business_date):
    return dict(rrn=0, orig_rrn=0, amount_fen=0, fund_fen=0, deductible_fen=0, ins_leg_fen=0,
                aid_leg_fen=0, fin_leg_fen=0, cash_fen=0, ins_balance_fen=0, fin_balance_fen=0,
                other_balance_fen=0, card_slot=-1, other_slot=-1, business_date=business_date,
                auth_code=0, code=0, cmd=q["cmd"], pin_outcome=0, outcome_flags=0, acc_group=0)


ANSWER_FIELDS = ("code", "acc_group", "amount_fen", "fund_fen", "deductible_fen", "ins_leg_fen",
                 "aid_leg_fen", "fin_leg_fen", "cash_fen", "ins_balance_fen", "fin_balance_fen",
                 "other_balance_fen", "card_slot", "other_slot", "auth_code", "orig_rrn",
                 "outcome_flags")


class Reference:
    def __init__(self, config: NodeConfig, capacity: int = 1 << 62):
        self.config = config
        self.capacity = capacity                     # the engine's card_capacity (96 beyond it)
        self.cards: list[Card] = []
        self.by_pan: dict[int, int] = {}
        self.live_by_person: dict[int, int] = {}
        self.entries: dict[int, Entry] = {}          # rrn → entry
        self.by_idem: dict[int, int] = {}            # idem key → rrn
        self.by_rev: dict[int, int] = {}             # (terminal, batch, stan) → rrn
        self.txn_count = 0
        self.institutions = config.institutions
        self.terminals = config.terminals
        self.inst_index = {x.code: i for i, x in enumerate(config.institutions)}
        self.tries_social_max = config.limits.pin_tries_social_max
        self.tries_bank_max = config.limits.pin_tries_bank_max
        self.family_aid_max = config.limits.family_aid_per_settlement_fen_max
        self.aid_beneficiaries_max = config.limits.family_aid_beneficiaries_per_payer_max
        self.limits = {Cmd.PURCHASE: config.limits.purchase_fen_max,
                       Cmd.WITHDRAW: config.limits.withdrawal_fen_max,
                       Cmd.TRANSFER: config.limits.transfer_fen_max,
                       Cmd.DEPOSIT: config.limits.deposit_fen_max}

    # ---- policy ------------------------------------------------------------------------------
    def policy(self, card: Card, med_type: int, level: int):
        """The first configured policy that matches (the engine's dense table is built the same way)."""
        for p in self.config.policies:
            if p.region is not None and p.region != card.region:
                continue
            if p.ins_type is not None and p.ins_type != card.ins_type:
                continue
            if p.person_type != "any" and (p.person_type == "retired") != bool(card.retired):
                continue
            if med_type not in p.visit_types:
                continue
            if p.levels and level not in p.levels:
                continue
            return p
        return None

    # ---- gates -------------------------------------------------------------------------------
    def card_gate(self, card: Card, need_fin: bool, bd: int) -> int:
        if card.flags & CardFlag.STOLEN:
            return rc("43")
        if card.status in (CardStatus.LOST, CardStatus.REPLACED):
            return rc("41")
        if card.status == CardStatus.TEMP_LOST and bd <= card.temp_loss_until:
            return rc("41")
        if card.status in (CardStatus.CANCELLED, CardStatus.ISSUED, CardStatus.EMPTY):
            return rc("62")
        if need_fin and not card.flags & CardFlag.FIN_ACTIVE:
            return rc("62")
        if card.expiry_yymm and card.expiry_yymm < (bd // 100) % 10000:
            return rc("54")
        return 0

    def live(self, slot: int) -> int:
        hops = 0
        while slot >= 0 and self.cards[slot].status == CardStatus.REPLACED and hops < 64:
            slot = self.cards[slot].payer
            hops += 1
        return slot

    def pin_gate(self, card: Card, q, res, social: bool, required: bool) -> int:
        tries_max = self.tries_social_max if social else self.tries_bank_max
        tries = card.tries_social if social else card.tries_bank
        given = q["flags"] & (ReqFlag.PIN | ReqFlag.PIN_REPLAY_OK | ReqFlag.PIN_REPLAY_BAD)
        if not given:
            if not required:
                return 0
            return rc("75") if tries >= tries_max else rc("55")
        if tries >= tries_max:
            return rc("75")
        if q["flags"] & ReqFlag.PIN_REPLAY_OK:
            right = True
        elif q["flags"] & ReqFlag.PIN_REPLAY_BAD:
            right = False
        else:
            right = q["pin_pvv"] == (card.pvv_social if social else card.pvv_bank)
        tries = 0 if right else tries + 1
        if social:
            card.tries_social = tries
        else:
            card.tries_bank = tries
        res["pin_outcome"] = 1 if right else 2
        if right:
            return 0
        return rc("75") if tries >= tries_max else rc("55")

    # ---- one message -------------------------------------------------------------------------
    def apply(self, q, bd: int) -> dict:
        """Apply one request (a numpy row or a dict with the request fields) under date `bd`."""
        if not isinstance(q, dict):       # numpy scalars wrap on shifts: plain ints only
            q = {name: int(q[name]) for name in q.dtype.names}
        res = blank_result(q, bd)
        res["code"] = self._apply(q, res, bd)
        return res

    def _new_entry(self, q, res, rev_key, bd) -> Entry:
        self.txn_count += 1
        e = Entry(self.txn_count, q["idem_key"], q["content_hash"], rev_key, q["cmd"],
                  q["terminal_index"], q["stan"], q["batch_no"], bd)
        self.entries[e.rrn] = e
        self.by_idem[e.idem_key] = e.rrn
        if rev_key:
            self.by_rev[rev_key] = e.rrn
        res["rrn"] = e.rrn
        return e

    @staticmethod
    def rev_key(q) -> int:
        return ((q["terminal_index"] + 1) << 40) | ((q["batch_no"] & 0xFFFFF) << 20) | (q["stan"] & 0xFFFFF)

    def _apply(self, q, res, bd) -> int:
        cmd = q["cmd"]
        lifecycle = cmd >= Cmd.ISSUE
        if q["pre_code"]:
            return q["pre_code"]
        if not (1 <= cmd <= 11 or 32 <= cmd <= 46):
            return rc("12")
        term = q["terminal_index"]
        inst = q["institution_index"]
        if not lifecycle:
            if not 0 <= term < len(self.terminals):
                return rc("97")
            if not 0 <= inst < len(self.institutions) or self.inst_index[self.terminals[term].institution] != inst:
                return rc("03")
        for name in ("amount_fen", "fo_fen", "ol_fen", "ps_fen", "is_fen", "fp_fen", "amount2_fen"):
            if not 0 <= q[name] <= AMOUNT_FEN_MAX:
                return rc("13")
        if cmd in (Cmd.MED_SETTLE, Cmd.MED_PRESETTLE):
            if q["fo_fen"] + q["ol_fen"] + q["ps_fen"] + q["is_fen"] != q["amount_fen"]:
                return rc("13")
            if q["flags"] & ReqFlag.FP and q["fp_fen"] > q["is_fen"]:
                return rc("13")
            if q["med_type"] not in VISIT_KIND:
                return rc("12")
        if not lifecycle:
            kind = KIND[self.institutions[inst].kind]
            allowed = {
                Cmd.BALANCE: {1, 2, 3, 4},
                Cmd.PURCHASE: {1, 2, 4}, Cmd.VOID: {1, 2, 4}, Cmd.REFUND: {1, 2, 4},
                Cmd.MED_SETTLE: {1, 2}, Cmd.MED_CANCEL: {1, 2}, Cmd.MED_PRESETTLE: {1, 2},
                Cmd.DEPOSIT: {3}, Cmd.WITHDRAW: {3}, Cmd.TRANSFER: {3},
            }.get(cmd, {1, 2, 3, 4})
            if kind not in allowed:
                return rc("58")
            if cmd in (Cmd.MED_SETTLE, Cmd.MED_PRESETTLE) and (q["med_type"] == 41) != (kind == 2):
                return rc("58")
        if q["idem_key"] and q["idem_key"] in self.by_idem:
            e = self.entries[self.by_idem[q["idem_key"]]]
            if e.content_hash != q["content_hash"]:
                return rc("94")
            res.update(e.answer)
            res["rrn"] = e.rrn
            res["orig_rrn"] = e.rrn
            res["outcome_flags"] = ResFlag.DUPLICATE
            return e.answer["code"]
        if lifecycle and not q["idem_key"]:
            entry = None
        else:
            rev_key = 0
            if cmd in REVERSIBLE:
                rev_key = self.rev_key(q)
                prior = self.by_rev.get(rev_key)
                if prior is not None and self.entries[prior].state == "tombstone":
                    entry = self._new_entry(q, res, 0, bd)
                    entry.answer = {k: res[k] for k in ANSWER_FIELDS} | {"code": rc("25")}
                    return rc("25")
            entry = self._new_entry(q, res, rev_key, bd)
        code = self._checked(q, res, bd, entry)
        if entry is not None and code in APPROVED:
            res["auth_code"] = entry.rrn % 1000000 or 1
        res["code"] = code
        if entry is not None:
            entry.answer = {k: res[k] for k in ANSWER_FIELDS}
        return code

    def _checked(self, q, res, bd, entry) -> int:
        cmd = q["cmd"]
        if cmd == Cmd.ISSUE:
            return self.issue(q, res)
        if cmd == Cmd.REVERSAL:
            return self.reversal(q, res, bd, entry)
        if not q["pan_hash"] and q["person_hash"] and cmd in (Cmd.CREDIT_FIN, Cmd.CREDIT_INS):
            slot = self.live_by_person.get(q["person_hash"], -1)
        else:
            slot = self.by_pan.get(q["pan_hash"], -1)
        if slot < 0:
            return rc("14")
        card = self.cards[slot]
        res["card_slot"] = slot
        res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
        if cmd > Cmd.ISSUE and cmd not in (Cmd.FAMILY_BIND, Cmd.FAMILY_UNBIND):
            return self.lifecycle(q, res, slot, bd)
        credit_back = cmd in (Cmd.VOID, Cmd.REFUND, Cmd.MED_CANCEL)
        if credit_back:
            if self.cards[self.live(slot)].status == CardStatus.CANCELLED:
                return rc("62")
        else:
            need_fin = cmd not in (Cmd.MED_SETTLE, Cmd.MED_PRESETTLE, Cmd.FAMILY_BIND,
                                   Cmd.FAMILY_UNBIND, Cmd.BALANCE)
            code = self.card_gate(card, need_fin, bd)
            if code:
                return code
        if cmd in (Cmd.FAMILY_BIND, Cmd.FAMILY_UNBIND):
            return self.family(q, res, slot, bd)
        social = cmd in (Cmd.MED_SETTLE, Cmd.MED_PRESETTLE, Cmd.MED_CANCEL)
        if social and cmd != Cmd.MED_CANCEL:
            required = bool(card.flags & CardFlag.SOCIAL_PIN)
        else:
            required = cmd in (Cmd.BALANCE, Cmd.PURCHASE, Cmd.WITHDRAW, Cmd.TRANSFER)
        code = self.pin_gate(card, q, res, social, required)
        if code:
            return code
        limit = self.limits.get(cmd, 0)
        if q["amount_fen"] > 0 and limit and q["amount_fen"] > limit:
            return rc("61")
        if cmd in (Cmd.MED_SETTLE, Cmd.MED_PRESETTLE):
            return self.medical(q, res, slot, bd, post=cmd == Cmd.MED_SETTLE)
        if credit_back:
            return self.undo(q, res, slot, bd)
        if cmd == Cmd.BALANCE:
            return rc("00")
        amount = q["amount_fen"]
        if cmd == Cmd.DEPOSIT:
            card.fin += amount
            res["fin_leg_fen"] = -amount
        elif cmd in (Cmd.PURCHASE, Cmd.WITHDRAW):
            if card.fin < amount:
                return rc("51")
            card.fin -= amount
            res["fin_leg_fen"] = amount
        elif cmd == Cmd.TRANSFER:
            other = self.by_pan.get(q["pan2_hash"], -1)
            if other < 0:
                return rc("14")
            if other == slot:
                return rc("12")
            if self.card_gate(self.cards[other], True, bd):
                return rc("57")
            if card.fin < amount:
                return rc("51")
            card.fin -= amount
            self.cards[other].fin += amount
            res["fin_leg_fen"] = amount
            res["other_slot"] = other
            res["other_balance_fen"] = self.cards[other].fin
        res["amount_fen"] = amount
        res["outcome_flags"] |= ResFlag.POSTED
        res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
        return rc("00")

    # ---- medical settlement (DOMAIN.md §2) -----------------------------------------------------
    def medical(self, q, res, slot, bd, post) -> int:
        card = self.cards[slot]
        group = 1 if q["med_type"] == 21 else 0
        current = card.acc_year == bd // 10000
        ded_used = card.ded_used[group] if current else 0
        fund_paid = card.fund_paid[group] if current else 0
        admissions = card.admissions[group] if current else 0
        res["acc_group"] = group
        ded = 0
        flags = 0
        in_scope = q["is_fen"]
        if q["flags"] & ReqFlag.FP:
            fund = q["fp_fen"]
        else:
            level = self.institutions[q["institution_index"]].level
            p = self.policy(card, q["med_type"], level)
            if p is None:
                res["outcome_flags"] |= ResFlag.NO_POLICY
                return rc("12")
            # 1. deductible (起付线)
            if p.per_admission:
                ded = min(in_scope, p.deductible_first_fen if admissions == 0 else p.deductible_later_fen)
            else:
                ded = min(in_scope, max(0, p.deductible_first_fen - ded_used))
            # 2. ratio bands on the in-scope axis, each band's part rounded half-up to the fen
            fund = 0
            if p.fund_pays:
                lower = 0
                for band in p.bands:
                    upper = band.upper_fen if band.upper_fen is not None else 2 ** 63 - 1
                    part = min(upper, in_scope) - max(lower, ded)
                    if part > 0:
                        fund += (part * band.ratio_bp + 5000) // 10000
                    lower = upper
                # 3. annual cap (封顶线)
                fund = min(fund, max(0, p.cap_fen - fund_paid))
            flags = ResFlag.ADMISSION if p.per_admission else (ResFlag.CUMULATIVE if ded > 0 else 0)
        # 4.–6. patient share: insurance account, family-aid payer, financial account, cash
        share = q["amount_fen"] - fund
        ins = aid = 0
        payer = -1
        if q["flags"] & ReqFlag.AU:
            ins = min(share, card.ins)
            payer_now = self.live(card.payer)
            if payer_now >= 0 and self.card_gate(self.cards[payer_now], False, bd) == 0:
                payer = payer_now
                aid = min(share - ins, self.cards[payer].ins)
                if self.family_aid_max:
                    aid = min(aid, self.family_aid_max)
        rest = share - ins - aid
        fin_avail = card.fin if card.flags & CardFlag.FIN_ACTIVE else 0
        code = rc("00")
        cash = 0
        if rest <= fin_avail:
            fin = rest
        elif q["flags"] & ReqFlag.PA:
            fin = fin_avail
            cash = rest - fin
            code = rc("10")
        else:
            res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
            return rc("51")
        res.update(amount_fen=q["amount_fen"], fund_fen=fund, deductible_fen=ded, ins_leg_fen=ins, aid_leg_fen=aid,
                   fin_leg_fen=fin, cash_fen=cash, other_slot=payer if aid > 0 else -1)
        if not post:
            res["ins_balance_fen"] = card.ins - ins
            res["fin_balance_fen"] = card.fin - fin
            if aid > 0:
                res["other_balance_fen"] = self.cards[payer].ins - aid
            return code
        if not current:
            card.ded_used, card.fund_paid, card.admissions = [0, 0], [0, 0], [0, 0]
            card.acc_year = bd // 10000
        card.ins -= ins
        card.fin -= fin
        if aid > 0:
            self.cards[payer].ins -= aid
            res["other_balance_fen"] = self.cards[payer].ins
        card.fund_paid[group] += fund
        if flags & ResFlag.CUMULATIVE:
            card.ded_used[group] += ded
        if flags & ResFlag.ADMISSION:
            card.admissions[group] += 1
        res["outcome_flags"] |= flags | ResFlag.POSTED
        res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
        return code

    def settle_post(self, slot, payer, answer, business_date, sign):
        card = self.cards[slot]
        card.ins -= sign * answer["ins_leg_fen"]
        card.fin -= sign * answer["fin_leg_fen"]
        if answer["aid_leg_fen"] and payer >= 0:
            self.cards[payer].ins -= sign * answer["aid_leg_fen"]
        if card.acc_year == business_date // 10000:
            g = answer["acc_group"]
            card.fund_paid[g] += sign * answer["fund_fen"]
            if answer["outcome_flags"] & ResFlag.CUMULATIVE:
                card.ded_used[g] += sign * answer["deductible_fen"]
            if answer["outcome_flags"] & ResFlag.ADMISSION:
                card.admissions[g] += sign

    def undo(self, q, res, slot, bd) -> int:
        want = Cmd.MED_SETTLE if q["cmd"] == Cmd.MED_CANCEL else Cmd.PURCHASE
        res["orig_rrn"] = q["orig_rrn"]
        o = self.entries.get(q["orig_rrn"])
        if o is None or o.cmd != want or o.state == "tombstone":
            return rc("25")
        if (q["orig_stan"] and o.stan != q["orig_stan"]) or (q["orig_batch"] and o.batch_no != q["orig_batch"]):
            return rc("25")
        oslot = self.live(o.answer["card_slot"])
        if oslot != self.live(slot):
            return rc("25")
        if o.answer["code"] not in APPROVED or o.state != "open":
            return rc("12")
        card = self.cards[oslot]
        a = o.answer
        if q["cmd"] == Cmd.REFUND:
            if q["amount_fen"] > a["amount_fen"] - o.refunded:
                return rc("64")
            o.refunded += q["amount_fen"]
            card.fin += q["amount_fen"]
            res["amount_fen"] = q["amount_fen"]
            res["fin_leg_fen"] = -q["amount_fen"]
        else:
            if q["amount_fen"] != a["amount_fen"]:
                return rc("64")
            if q["cmd"] == Cmd.VOID:
                if o.business_date != bd or o.refunded:
                    return rc("12")
                card.fin += a["fin_leg_fen"]
                res["fin_leg_fen"] = -a["fin_leg_fen"]
            else:
                payer = self.live(a["other_slot"])
                self.settle_post(oslot, payer, a, o.business_date, -1)
                for k in ("fund_fen", "deductible_fen", "ins_leg_fen", "aid_leg_fen", "fin_leg_fen", "cash_fen"):
                    res[k] = -a[k]
                res["acc_group"] = a["acc_group"]
                res["other_slot"] = payer if a["aid_leg_fen"] else -1
                if res["other_slot"] >= 0:
                    res["other_balance_fen"] = self.cards[payer].ins
            o.state = "undone"
            res["amount_fen"] = a["amount_fen"]
        res["card_slot"] = oslot
        res["outcome_flags"] |= ResFlag.POSTED
        res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
        return rc("00")

    def reversal(self, q, res, bd, entry) -> int:
        rev_key = self.rev_key(q)
        rrn = self.by_rev.get(rev_key)
        if rrn is None:
            res["outcome_flags"] |= ResFlag.TOMBSTONE
            entry.state = "tombstone"
            entry.rev_key = rev_key
            self.by_rev[rev_key] = entry.rrn
            return rc("00")
        o = self.entries[rrn]
        res["orig_rrn"] = o.rrn
        if o.state in ("tombstone", "reversed"):
            return rc("00")
        a = o.answer
        if q["pan_hash"] and a["card_slot"] >= 0 and self.cards[a["card_slot"]].pan_hash != q["pan_hash"]:
            return rc("25")
        res["acc_group"] = a["acc_group"]
        if a["code"] not in APPROVED:
            o.state = "reversed"
            return rc("00")
        slot = self.live(a["card_slot"])
        other = self.live(a["other_slot"])
        card = self.cards[slot]
        if o.cmd in (Cmd.PURCHASE, Cmd.WITHDRAW):
            if o.state == "open":
                card.fin += a["fin_leg_fen"] - o.refunded
                res["fin_leg_fen"] = -(a["fin_leg_fen"] - o.refunded)
        elif o.cmd == Cmd.DEPOSIT:
            if card.fin < -a["fin_leg_fen"]:
                res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
                return rc("51")
            card.fin += a["fin_leg_fen"]
            res["fin_leg_fen"] = -a["fin_leg_fen"]
        elif o.cmd == Cmd.TRANSFER:
            if self.cards[other].fin < a["fin_leg_fen"]:
                res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
                return rc("51")
            self.cards[other].fin -= a["fin_leg_fen"]
            card.fin += a["fin_leg_fen"]
            res["fin_leg_fen"] = -a["fin_leg_fen"]
            res["other_slot"] = other
            res["other_balance_fen"] = self.cards[other].fin
        elif o.cmd == Cmd.MED_SETTLE:
            if o.state == "open":
                self.settle_post(slot, other, a, o.business_date, -1)
                for k in ("fund_fen", "deductible_fen", "ins_leg_fen", "aid_leg_fen", "fin_leg_fen", "cash_fen"):
                    res[k] = -a[k]
        elif o.cmd in (Cmd.VOID, Cmd.MED_CANCEL):
            inner = self.entries.get(a["orig_rrn"])
            if inner is not None and inner.state == "undone":
                ia = inner.answer
                if o.cmd == Cmd.VOID:
                    if card.fin < ia["fin_leg_fen"]:
                        res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
                        return rc("51")
                    card.fin -= ia["fin_leg_fen"]
                    res["fin_leg_fen"] = ia["fin_leg_fen"]
                else:
                    payer = self.live(ia["other_slot"])
                    if (card.ins < ia["ins_leg_fen"] or card.fin < ia["fin_leg_fen"] or
                            (ia["aid_leg_fen"] > 0 and (payer < 0 or self.cards[payer].ins < ia["aid_leg_fen"]))):
                        res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
                        return rc("51")
                    self.settle_post(slot, payer, ia, inner.business_date, 1)
                    for k in ("fund_fen", "deductible_fen", "ins_leg_fen", "aid_leg_fen", "fin_leg_fen", "cash_fen"):
                        res[k] = ia[k]
                inner.state = "open"
        o.state = "reversed"
        res["amount_fen"] = a["amount_fen"]
        res["card_slot"] = slot
        res["outcome_flags"] |= ResFlag.POSTED
        res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
        return rc("00")

    # ---- lifecycle ---------------------------------------------------------------------------
    def issue(self, q, res) -> int:
        regions = {r.code for r in self.config.regions}
        types = {t.code for t in self.config.ins_types}
        if (not q["pan_hash"] or not q["person_hash"] or q["region_code"] not in regions
                or q["ins_type"] not in types or (q["acct_type"] & 0x0F) > 1):
            return rc("12")
        if not CardStatus.ISSUED <= q["med_type"] <= CardStatus.CANCELLED:
            return rc("12")
        if q["pan_hash"] in self.by_pan:
            return rc("94")
        live = self.live_by_person.get(q["person_hash"])
        if live is not None and self.cards[live].status not in (CardStatus.CANCELLED, CardStatus.REPLACED):
            return rc("57")
        if len(self.cards) >= self.capacity:
            return rc("96")
        slot = len(self.cards)
        self.cards.append(Card(q["pan_hash"], q["person_hash"], q["amount_fen"], q["amount2_fen"],
                               q["region_code"], q["ins_type"], q["acct_type"] & 0x0F, q["med_type"],
                               q["acct_type"] >> 4, q["pin_pvv"], q["pin_pvv_new"], q["expiry_yymm"]))
        self.by_pan[q["pan_hash"]] = slot
        self.live_by_person[q["person_hash"]] = slot
        res["card_slot"] = slot
        res["outcome_flags"] |= ResFlag.POSTED
        res["ins_balance_fen"], res["fin_balance_fen"] = q["amount_fen"], q["amount2_fen"]
        return rc("00")

    def unbind(self, card: Card) -> None:
        """The card's payer covers one beneficiary fewer (counted on the payer's live card)."""
        bound = self.live(card.payer)
        if bound >= 0 and self.cards[bound].aid_beneficiaries > 0:
            self.cards[bound].aid_beneficiaries -= 1
        card.payer = -1

    def family(self, q, res, slot, bd) -> int:
        card = self.cards[slot]
        if q["cmd"] == Cmd.FAMILY_UNBIND:
            self.unbind(card)
            res["outcome_flags"] |= ResFlag.POSTED
            return rc("00")
        payer = self.by_pan.get(q["pan2_hash"], -1)
        if payer < 0:
            return rc("14")
        if payer == slot or self.cards[payer].region != card.region:
            return rc("12")
        if self.card_gate(self.cards[payer], False, bd):
            return rc("57")
        if payer != self.live(card.payer):
            if self.aid_beneficiaries_max and self.cards[payer].aid_beneficiaries >= self.aid_beneficiaries_max:
                return rc("65")
            self.unbind(card)
            self.cards[payer].aid_beneficiaries += 1
        card.payer = payer
        res["other_slot"] = payer
        res["outcome_flags"] |= ResFlag.POSTED
        return rc("00")

    def lifecycle(self, q, res, slot, bd) -> int:
        """DOMAIN.md §1 lifecycle and §3 money in, one state machine per card."""
        import datetime
        card = self.cards[slot]
        cmd, st = q["cmd"], card.status
        social = (q["acct_type"] & 1) == 0
        if st == CardStatus.CANCELLED:
            return rc("62")
        if st == CardStatus.REPLACED:
            return rc("41")
        temp_lost_now = st == CardStatus.TEMP_LOST and bd <= card.temp_loss_until
        if cmd == Cmd.ACTIVATE_SOCIAL:
            if st != CardStatus.ISSUED:
                return rc("41") if st == CardStatus.LOST else rc("12")
            card.status = CardStatus.ACTIVE
        elif cmd == Cmd.ACTIVATE_FIN:
            if st == CardStatus.LOST or temp_lost_now:
                return rc("41")
            if card.flags & CardFlag.FIN_ACTIVE:
                return rc("12")
            card.flags |= CardFlag.FIN_ACTIVE
        elif cmd == Cmd.TEMP_LOSS:
            if st == CardStatus.LOST:
                return rc("12")
            days = next(r.temp_loss_days for r in self.config.regions if r.code == card.region)
            until = datetime.date(bd // 10000, bd // 100 % 100, bd % 100) + datetime.timedelta(days=days)
            card.status = CardStatus.TEMP_LOST
            card.temp_loss_until = until.year * 10000 + until.month * 100 + until.day
        elif cmd == Cmd.FORMAL_LOSS:
            card.status = CardStatus.LOST
            if q["med_type"] == 1:
                card.flags |= CardFlag.STOLEN
        elif cmd == Cmd.UNLOSS:
            if st != CardStatus.TEMP_LOST:
                return rc("12")
            card.status = CardStatus.ACTIVE
        elif cmd == Cmd.REPLACE:
            if not q["pan2_hash"]:
                return rc("12")
            if q["pan2_hash"] in self.by_pan:
                return rc("94")
            if len(self.cards) >= self.capacity:
                return rc("96")
            new = Card(q["pan2_hash"], card.person_hash, card.ins, card.fin, card.region, card.ins_type,
                       card.retired, CardStatus.ACTIVE, card.flags & ~(CardFlag.STOLEN | CardFlag.SOCIAL_PIN),
                       q["pin_pvv"], q["pin_pvv_new"], card.expiry_yymm, payer=card.payer,
                       acc_year=card.acc_year, ded_used=list(card.ded_used), fund_paid=list(card.fund_paid),
                       admissions=list(card.admissions), aid_beneficiaries=card.aid_beneficiaries)
            card.aid_beneficiaries = 0
            other = len(self.cards)
            self.cards.append(new)
            self.by_pan[new.pan_hash] = other
            self.live_by_person[card.person_hash] = other
            card.ins = card.fin = 0
            card.status = CardStatus.REPLACED
            card.payer = other
            res["other_slot"] = other
            res["other_balance_fen"] = new.fin
        elif cmd == Cmd.CANCEL_CARD:
            if card.ins or card.fin:
                if not q["pan2_hash"]:
                    return rc("12")
                other = self.live(self.by_pan.get(q["pan2_hash"], -1))
                if other < 0:
                    return rc("14")
                if other == slot or self.card_gate(self.cards[other], True, bd):
                    return rc("57")
                target = self.cards[other]
                res["ins_leg_fen"], res["fin_leg_fen"] = card.ins, card.fin
                target.ins += card.ins
                target.fin += card.fin
                card.ins = card.fin = 0
                res["other_slot"] = other
                res["other_balance_fen"] = target.fin
            self.unbind(card)
            card.status = CardStatus.CANCELLED
            card.flags &= ~CardFlag.FIN_ACTIVE
            self.live_by_person.pop(card.person_hash, None)
        elif cmd == Cmd.PIN_CHANGE:
            code = self.pin_gate(card, q, res, social, True)
            if code:
                return code
            if social:
                card.pvv_social = q["pin_pvv_new"]
                card.flags |= CardFlag.SOCIAL_PIN
            else:
                card.pvv_bank = q["pin_pvv_new"]
        elif cmd == Cmd.PIN_RESET:
            if social:
                card.pvv_social, card.tries_social = q["pin_pvv_new"], 0
                card.flags &= ~CardFlag.SOCIAL_PIN
            else:
                card.pvv_bank, card.tries_bank = q["pin_pvv_new"], 0
        elif cmd == Cmd.PIN_UNLOCK:
            if social:
                card.tries_social = 0
            else:
                card.tries_bank = 0
        elif cmd == Cmd.CREDIT_FIN:
            code = self.card_gate(card, True, bd)
            if code and code != rc("54"):
                return code
            card.fin += q["amount_fen"]
            res["amount_fen"], res["fin_leg_fen"] = q["amount_fen"], -q["amount_fen"]
        elif cmd == Cmd.CREDIT_INS:
            card.ins += q["amount_fen"]
            res["amount_fen"], res["ins_leg_fen"] = q["amount_fen"], -q["amount_fen"]
        else:
            return rc("12")
        res["outcome_flags"] |= ResFlag.POSTED
        res["ins_balance_fen"], res["fin_balance_fen"] = card.ins, card.fin
        return rc("00")
