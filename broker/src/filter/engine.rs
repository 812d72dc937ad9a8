//! The Lua side of filters: one sandboxed Lua 5.4 state per thread, the compiled
//! filters it holds, and the call itself. Nothing of mlua leaves this file.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::chunk::ChunkMode;
use mlua::{Function, HookTriggers, Lua, LuaOptions, LuaString, StdLib, Table, Value, VmState};

use crate::filter::{Context, EvalError, EventView, FilterLimits, LoadedFilter};

/// Instructions between two checks of the budget.
const HOOK_EVERY: u32 = 1000;
/// Context tables kept per thread before the cache is emptied.
const MAX_CACHED_CONTEXTS: usize = 20_000;
/// Deepest JSON nesting `event:json()` converts.
const MAX_JSON_DEPTH: usize = 64;
/// Longest a call may run, whatever its instruction count (a backstop for time the
/// budget does not see).
const MAX_CALL_TIME: Duration = Duration::from_millis(250);

/// The loops that judge a batch of subscriptions, run once per state in a chunk of
/// their own (`=judge`: the only code the hook lets finish past a budget, since it
/// ends each call itself). Given the state table and the real `pcall`.
const JUDGE: &str = r#"
local state, real_pcall = ...
-- Judges subscriptions list[1..n] (indices into `slots`, the subscription tables)
-- on one event: verdict i is bit (i - 1) % 64 of out[(i - 1) // 64 + 1].
-- `state.current` says which call runs (the hook starts a new budget when it
-- changes). The fast way calls the filter unprotected: it returns 0 when every
-- call returned a boolean, or the index of one that did not; a call that raises an
-- error ends it. The careful way then takes over from the start of that word of
-- verdicts, with each call protected on its own (why one failed goes to
-- errors[i]), so one failing subscription withholds only its own delivery; it
-- returns the number of failures.
-- (The two loops repeat their bit packing on purpose: a shared helper would be a
-- Lua call per subscription in the fast loop.)
local function judge_fast(f, event, slots, list, n, out)
  local word, bits, bit = 1, 0, 1
  for i = 1, n do
    state.current = i
    state.exhausted = false
    local verdict = f(event, slots[list[i]])
    if verdict == true then
      bits = bits | bit
    elseif verdict ~= false then
      return i
    end
    bit = bit << 1
    if bit == 0 then
      out[word] = bits
      word, bits, bit = word + 1, 0, 1
    end
  end
  if bit ~= 1 then
    out[word] = bits
  end
  return 0
end
local function judge_careful(f, event, slots, list, n, out, errors, from)
  local failed, word, bits, bit = 0, (from - 1) // 64 + 1, 0, 1
  for i = from, n do
    state.current = i
    state.exhausted = false
    local ok, verdict = real_pcall(f, event, slots[list[i]])
    if ok and verdict == true then
      bits = bits | bit
    elseif not ok then
      failed = failed + 1
      errors[i] = verdict == nil and "the filter raised nil" or verdict
    elseif verdict ~= false then
      failed = failed + 1
      errors[i] = "the filter returned " .. type(verdict) .. ", not a boolean"
    end
    bit = bit << 1
    if bit == 0 then
      out[word] = bits
      word, bits, bit = word + 1, 0, 1
    end
  end
  if bit ~= 1 then
    out[word] = bits
  end
  return failed
end
return judge_fast, judge_careful
"#;

/// Lua run once per state. It is given the state table the hook shares with it
/// (`state.exhausted`: the running call has used up its budget; `state.current`: the
/// subscription of a batch being judged). It removes what could load code or escape
/// the budget, bounds the C functions whose time the instruction hook cannot see,
/// makes the libraries read-only, and returns the base environment filters' globals
/// fall back to.
const PRELUDE: &str = r#"
local state = ...
local real_pcall, real_xpcall, real_setmetatable = pcall, xpcall, setmetatable
local real_rep, real_find, real_match, real_gmatch, real_gsub =
  string.rep, string.find, string.match, string.gmatch, string.gsub
local MAX_REP = 16 * 1024 * 1024
local MAX_SUBJECT = 64 * 1024
local MAX_QUANTIFIERS = 8

-- No bytecode, and no C loop the budget cannot interrupt.
string.dump = nil
table.move = nil

-- The real string table also serves method calls ("x"):rep(...), so the bounded
-- versions replace the originals in it.
string.rep = function(s, n, sep)
  local count = tonumber(n) or 0
  local size = (#tostring(s) + #tostring(sep or "")) * count
  if size > MAX_REP or count > MAX_REP then
    error("string.rep: the result would pass 16 MiB", 2)
  end
  return real_rep(s, n, sep)
end
local function check_pattern(s, p)
  if type(s) == "string" and #s > MAX_SUBJECT then
    error("string patterns take subjects of at most 64 KiB", 3)
  end
  if type(p) == "string" then
    local _, quantifiers = real_gsub(p, "[%*%+%-%?]", "")
    if quantifiers > MAX_QUANTIFIERS then
      error("string patterns may use at most 8 quantifiers (* + - ?)", 3)
    end
  end
end
string.find = function(s, p, ...) check_pattern(s, p) return real_find(s, p, ...) end
string.match = function(s, p, ...) check_pattern(s, p) return real_match(s, p, ...) end
string.gmatch = function(s, p, ...) check_pattern(s, p) return real_gmatch(s, p, ...) end
string.gsub = function(s, p, ...) check_pattern(s, p) return real_gsub(s, p, ...) end

-- A call past its budget stays failed: pcall cannot swallow that error.
local function guard(...)
  if state.exhausted then
    error("instruction budget exhausted", 0)
  end
  return ...
end
local function safe_pcall(f, ...) return guard(real_pcall(f, ...)) end
local function safe_xpcall(f, handler, ...) return guard(real_xpcall(f, handler, ...)) end
-- Finalizers would run inside other filters' calls.
local function safe_setmetatable(t, mt)
  if mt ~= nil and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not allowed in filters", 2)
  end
  return real_setmetatable(t, mt)
end

local function readonly(t, name)
  return real_setmetatable({}, {
    __index = t,
    __newindex = function() error(name .. " is read-only", 2) end,
    __metatable = false,
  })
end
getmetatable("").__metatable = false
local base = {
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
  pcall = safe_pcall, select = select, tonumber = tonumber, tostring = tostring,
  type = type, xpcall = safe_xpcall, rawequal = rawequal, rawlen = rawlen, rawget = rawget,
  setmetatable = safe_setmetatable, getmetatable = getmetatable,
  string = readonly(string, "string"), table = readonly(table, "table"),
  math = readonly(math, "math"), utf8 = readonly(utf8, "utf8"),
}
local environment = readonly(base, "the base environment")
base._G = environment

return environment
"#;

/// A filter compiled in this thread's state, or why it would not compile (so a
/// failing version is not compiled again on every call).
struct Compiled {
    version: u64,
    function: Result<Filter, String>,
}

/// A compiled filter: its function and, when it declares one, its `share`.
#[derive(Clone)]
pub struct Filter {
    function: Function,
    /// The context field the verdict depends on only for the subscribers a record
    /// names, and the function that says which values of it a record names.
    share: Option<(String, Function)>,
}

/// A subscription table in this state: `slots[index]` is `{id = id, context = ...}`.
struct Slot {
    index: i64,
    /// The id the table holds now.
    id: u64,
}

type SlotMap = HashMap<(u64, u64), Slot, crate::hash::BuildIntHasher>;

/// This thread's Lua state and what it caches.
pub struct Engine {
    lua: Lua,
    /// The read-only base environment each filter's own environment falls back to.
    base: Table,
    /// The prelude's `judge_fast` and `judge_careful`: run a filter for a batch of
    /// subscriptions.
    judge_fast: Function,
    judge_careful: Function,
    filters: HashMap<String, Compiled>,
    /// Subscription tables (each with its context table) by (filter version, context
    /// id): each filter version has its own, so what one filter memoizes in a context
    /// cannot mislead another filter, nor outlive a reload.
    contexts: SlotMap,
    /// `slots[index]`: the subscription tables of `contexts`.
    slots: Table,
    /// Judge's output tables (verdict bits, errors), reused.
    out: Table,
    errors: Table,
    /// Slot indices of the batch being judged, reused.
    list: Vec<i64>,
    /// The record's table, made anew per (record, filter version): shared by the
    /// subscriptions one filter judges, never between filters.
    event: Table,
    event_key: Option<(u64, u64)>,
    /// `event:json()`, shared by every event table.
    json: Function,
    /// Instruction checks left for the running call.
    budget: Rc<Cell<u32>>,
    /// `state.current` when the hook last ran (-1: a new batch).
    current: Rc<Cell<i64>>,
    /// When the running call started.
    started: Rc<Cell<Instant>>,
    /// Shared with the prelude: `exhausted` is set when the running call used up its
    /// budget or time, and stays set for the rest of the call, so `pcall` cannot
    /// swallow it; `current` says which call of a batch runs.
    state: Table,
    limits: FilterLimits,
}

thread_local! {
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's engine, creating it (or replacing it, when the limits
/// changed) first.
pub fn with_engine<T>(
    limits: FilterLimits,
    f: impl FnOnce(&mut Engine) -> T,
) -> Result<T, EvalError> {
    ENGINE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|e| e.limits != limits) {
            *slot = Some(Engine::new(limits).map_err(|e| EvalError::Engine(e.to_string()))?);
        }
        Ok(f(slot.as_mut().expect("created above")))
    })
}

fn is_memory_error(error: &mlua::Error) -> bool {
    match error {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

fn lua_error(error: mlua::Error) -> String {
    // The message without mlua's traceback.
    match error {
        mlua::Error::CallbackError { cause, .. } => lua_error((*cause).clone()),
        mlua::Error::MemoryError(message) => format!("memory limit reached: {message}"),
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

impl Engine {
    fn new(limits: FilterLimits) -> mlua::Result<Engine> {
        let lua = Lua::new_with(
            StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8,
            LuaOptions::default(),
        )?;
        lua.set_memory_limit(limits.memory_bytes)?;
        let budget = Rc::new(Cell::new(0u32));
        let current = Rc::new(Cell::new(-1i64));
        let started = Rc::new(Cell::new(Instant::now()));
        let state = lua.create_table()?;
        state.raw_set("exhausted", false)?;
        let real_pcall: Function = lua.globals().raw_get("pcall")?;
        let (judge_fast, judge_careful): (Function, Function) = lua
            .load(JUDGE)
            .set_name("=judge")
            .set_mode(ChunkMode::Text)
            .call((state.clone(), real_pcall))?;
        let base: Table = lua
            .load(PRELUDE)
            .set_name("=prelude")
            .set_mode(ChunkMode::Text)
            .call(state.clone())?;
        let (left, seen, since, shared) = (
            budget.clone(),
            current.clone(),
            started.clone(),
            state.clone(),
        );
        let full = (limits.instructions / HOOK_EVERY).max(1);
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, debug| {
                // A new call of a batch starts a new budget.
                let now: i64 = shared.raw_get("current").unwrap_or(0);
                if now != seen.get() {
                    seen.set(now);
                    left.set(full);
                    since.set(Instant::now());
                }
                let remaining = left.get();
                let exhausted = shared.raw_get::<bool>("exhausted").unwrap_or(true);
                if remaining == 0 || exhausted || since.get().elapsed() > MAX_CALL_TIME {
                    shared.raw_set("exhausted", true)?;
                    // `judge`, between two calls, must not fail the rest of its
                    // batch; it starts the next call with a new budget itself.
                    if debug.source().source.as_deref() == Some("=judge") {
                        return Ok(VmState::Continue);
                    }
                    return Err(mlua::Error::runtime("instruction budget exhausted"));
                }
                left.set(remaining - 1);
                Ok(VmState::Continue)
            },
        )?;
        // event:json() decodes the payload once per event table and caches the result.
        let json = lua.create_function(|lua, event: Table| {
            if let Some(cached) = event
                .raw_get::<Option<Value>>("_json")?
                .filter(|v| !v.is_nil())
            {
                return Ok(cached);
            }
            let payload: LuaString = event.raw_get("payload")?;
            let parsed: serde_json::Value = serde_json::from_slice(&payload.as_bytes())
                .map_err(|e| mlua::Error::runtime(format!("payload is not JSON: {e}")))?;
            let value = json_to_lua(lua, &parsed, 0)?;
            event.raw_set("_json", value.clone())?;
            Ok(value)
        })?;
        let event = lua.create_table()?;
        Ok(Engine {
            base,
            judge_fast,
            judge_careful,
            filters: HashMap::new(),
            contexts: SlotMap::default(),
            slots: lua.create_table()?,
            out: lua.create_table()?,
            errors: lua.create_table()?,
            list: Vec::new(),
            event,
            event_key: None,
            json,
            budget,
            current,
            started,
            state,
            limits,
            lua,
        })
    }

    /// Starts the bounds of a call (or of a batch: each of its calls then starts its
    /// own).
    fn arm(&self) -> mlua::Result<()> {
        self.budget
            .set((self.limits.instructions / HOOK_EVERY).max(1));
        self.current.set(-1);
        self.started.set(Instant::now());
        self.state.raw_set("current", 0)?;
        self.state.raw_set("exhausted", false)
    }

    /// Compiles `source` (text only) into a filter function in a fresh environment.
    pub fn compile(&self, chunk_name: &str, source: &str) -> Result<Filter, String> {
        let env = self.lua.create_table().map_err(lua_error)?;
        let meta = self.lua.create_table().map_err(lua_error)?;
        meta.raw_set("__index", self.base.clone())
            .map_err(lua_error)?;
        env.set_metatable(Some(meta)).map_err(lua_error)?;
        let chunk = self
            .lua
            .load(source)
            .set_name(format!("@{chunk_name}"))
            .set_mode(ChunkMode::Text)
            .set_environment(env)
            .into_function()
            .map_err(lua_error)?;
        // Running the chunk defines the filter; it is bounded like a call.
        self.arm().map_err(lua_error)?;
        match chunk.call::<Value>(()).map_err(lua_error)? {
            Value::Function(function) => Ok(Filter {
                function,
                share: None,
            }),
            Value::Table(table) => {
                let function = match table.raw_get::<Value>("filter").map_err(lua_error)? {
                    Value::Function(function) => function,
                    other => {
                        return Err(format!(
                            "the returned table's `filter` must be the filter function, not {}",
                            other.type_name()
                        ));
                    }
                };
                let share = match table.raw_get::<Value>("share").map_err(lua_error)? {
                    Value::Nil => None,
                    Value::Table(share) => {
                        let field = match share.raw_get::<Value>("field").map_err(lua_error)? {
                            Value::String(field) => field.to_string_lossy(),
                            other => {
                                return Err(format!(
                                    "`share.field` must be the name of a context field, not {}",
                                    other.type_name()
                                ));
                            }
                        };
                        let named = match share.raw_get::<Value>("named").map_err(lua_error)? {
                            Value::Function(named) => named,
                            other => {
                                return Err(format!(
                                    "`share.named` must be a function (event -> the values of `{field}` it names), not {}",
                                    other.type_name()
                                ));
                            }
                        };
                        Some((field, named))
                    }
                    other => {
                        return Err(format!(
                            "`share` must be a table {{field = ..., named = function(event) ... end}}, not {}",
                            other.type_name()
                        ));
                    }
                };
                Ok(Filter { function, share })
            }
            other => Err(format!(
                "the file must return the filter function (`return function(event, subscription) ... end`) or a table with it, not {}",
                other.type_name()
            )),
        }
    }

    /// The context field `filter` shares verdicts over and the values of it that
    /// `event` names (`None`: the filter declares no `share`). A `named` that fails
    /// is an error; the caller then shares nothing.
    pub fn named(
        &mut self,
        filter: &LoadedFilter,
        event: &EventView<'_>,
    ) -> Result<Option<(String, Vec<String>)>, EvalError> {
        let Some((field, named)) = self.function(filter)?.share else {
            return Ok(None);
        };
        let names = (|| {
            self.set_event(event, filter.version)?;
            self.arm()?;
            let names: Value = named.call(&self.event)?;
            let mut values = Vec::new();
            match names {
                Value::Nil => {}
                Value::Table(names) => {
                    // A list with a gap would lose the values after it.
                    let entries = names.pairs::<Value, Value>().count();
                    if entries != names.raw_len() {
                        return Err(mlua::Error::runtime(
                            "share.named must return a list (keys 1..n, no gaps)",
                        ));
                    }
                    for name in names.sequence_values::<Value>() {
                        match name? {
                            Value::String(name) => values.push(name.to_string_lossy()),
                            Value::Integer(n) => values.push(n.to_string()),
                            other => {
                                return Err(mlua::Error::runtime(format!(
                                    "share.named returned a list holding a {}, not strings",
                                    other.type_name()
                                )));
                            }
                        }
                    }
                }
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "share.named returned {}, not a list of strings",
                        other.type_name()
                    )));
                }
            }
            Ok(values)
        })();
        match names {
            Ok(values) => Ok(Some((field, values))),
            Err(error) => {
                if is_memory_error(&error) {
                    self.drop_contexts();
                }
                Err(EvalError::Runtime(lua_error(error)))
            }
        }
    }

    /// The compiled function of `filter`, compiling it if this thread has another
    /// version.
    fn function(&mut self, filter: &LoadedFilter) -> Result<Filter, EvalError> {
        if let Some(compiled) = self.filters.get(&filter.name)
            && compiled.version == filter.version
        {
            return compiled.function.clone().map_err(EvalError::Compile);
        }
        let function = self.compile(&filter.file, &filter.source);
        self.filters.insert(
            filter.name.clone(),
            Compiled {
                version: filter.version,
                function: function.clone(),
            },
        );
        function.map_err(EvalError::Compile)
    }

    /// Makes the event table for a new (record, filter version).
    fn set_event(&mut self, event: &EventView<'_>, version: u64) -> mlua::Result<()> {
        if self.event_key == Some((event.key, version)) {
            return Ok(());
        }
        let table = self.lua.create_table_with_capacity(0, 8)?;
        table.raw_set("json", self.json.clone())?;
        table.raw_set("topic", event.topic)?;
        table.raw_set("offset", event.offset)?;
        table.raw_set("timestamp", event.timestamp_ms)?;
        let headers = self
            .lua
            .create_table_with_capacity(0, event.headers.len())?;
        for (key, value) in event.headers {
            headers.raw_set(key.as_str(), value.as_str())?;
        }
        table.raw_set("headers", headers)?;
        table.raw_set("payload", self.lua.create_string(event.payload)?)?;
        self.event = table;
        self.event_key = Some((event.key, version));
        Ok(())
    }

    /// Forgets every cached context and subscription table and collects the garbage
    /// (a full cache, or the memory limit reached).
    fn drop_contexts(&mut self) {
        self.contexts.clear();
        if let Ok(slots) = self.lua.create_table() {
            self.slots = slots;
        }
        let _ = self.lua.gc_collect();
    }

    /// The index in `slots` of the subscription table for `context` under filter
    /// `version`, holding `subscription_id`.
    fn slot(&mut self, context: &Context, version: u64, subscription_id: u64) -> mlua::Result<i64> {
        if let Some(slot) = self.contexts.get_mut(&(version, context.id())) {
            if slot.id != subscription_id {
                let table: Table = self.slots.raw_get(slot.index)?;
                table.raw_set("id", subscription_id)?;
                slot.id = subscription_id;
            }
            return Ok(slot.index);
        }
        let values = self
            .lua
            .create_table_with_capacity(0, context.values().len())?;
        for (key, value) in context.values() {
            values.raw_set(key.as_str(), value.as_str())?;
        }
        let table = self.lua.create_table_with_capacity(0, 2)?;
        table.raw_set("id", subscription_id)?;
        table.raw_set("context", values)?;
        let index = self.slots.raw_len() as i64 + 1;
        self.slots.raw_set(index, table)?;
        self.contexts.insert(
            (version, context.id()),
            Slot {
                index,
                id: subscription_id,
            },
        );
        Ok(index)
    }

    /// Runs `filter` for one subscription: `true` to deliver.
    pub fn evaluate(
        &mut self,
        filter: &LoadedFilter,
        event: &EventView<'_>,
        subscription_id: u64,
        context: &Context,
    ) -> Result<bool, EvalError> {
        let mut verdicts = Vec::with_capacity(1);
        self.evaluate_many(filter, event, &[(subscription_id, context)], &mut verdicts);
        verdicts.pop().expect("one verdict per subscription")
    }

    /// Runs `filter` for each of `subscriptions` (id, context) on one event, in one
    /// call into Lua, and appends their verdicts (`true` to deliver) to `verdicts` in
    /// order. Each subscription's call is bounded and contained on its own.
    pub fn evaluate_many(
        &mut self,
        filter: &LoadedFilter,
        event: &EventView<'_>,
        subscriptions: &[(u64, &Context)],
        verdicts: &mut Vec<Result<bool, EvalError>>,
    ) {
        let function = match self.function(filter) {
            Ok(compiled) => compiled.function,
            Err(error) => {
                verdicts.extend(subscriptions.iter().map(|_| Err(error.clone())));
                return;
            }
        };
        let first = verdicts.len();
        let judged = self.judge(&function, filter.version, event, subscriptions, verdicts);
        if let Err(error) = judged {
            // The batch itself failed (before or around the calls; not a filter's own
            // error, which `judge` catches per call).
            if is_memory_error(&error) {
                self.drop_contexts();
            }
            let error = EvalError::Runtime(lua_error(error));
            verdicts.truncate(first);
            verdicts.extend(subscriptions.iter().map(|_| Err(error.clone())));
        }
    }

    fn judge(
        &mut self,
        function: &Function,
        version: u64,
        event: &EventView<'_>,
        subscriptions: &[(u64, &Context)],
        verdicts: &mut Vec<Result<bool, EvalError>>,
    ) -> mlua::Result<()> {
        // A full cache is emptied before a batch, never during one (the slots of the
        // batch's list must stay where they are until it is judged).
        if self.contexts.len() + subscriptions.len() > MAX_CACHED_CONTEXTS {
            self.drop_contexts();
        }
        self.set_event(event, version)?;
        let mut list = std::mem::take(&mut self.list);
        list.clear();
        for &(id, context) in subscriptions {
            match self.slot(context, version, id) {
                Ok(index) => list.push(index),
                Err(error) => {
                    self.list = list;
                    return Err(error);
                }
            }
        }
        let indices = self.lua.create_sequence_from(list.iter().copied());
        self.list = list;
        let indices = indices?;
        self.arm()?;
        let n = subscriptions.len();
        let fast = self.judge_fast.call::<i64>((
            function,
            &self.event,
            &self.slots,
            &indices,
            n,
            &self.out,
        ));
        let failed = if matches!(fast, Ok(0)) {
            0
        } else {
            // A call failed: again from the start of its word of verdicts (those
            // before it in the word were not stored), each call protected.
            let current: i64 = self.state.raw_get("current")?;
            let from = (current.max(1) - 1) / 64 * 64 + 1;
            self.arm()?;
            // Nothing left from a careful run that itself failed.
            self.errors = self.lua.create_table()?;
            self.judge_careful.call::<usize>((
                function,
                &self.event,
                &self.slots,
                &indices,
                n,
                &self.out,
                &self.errors,
                from,
            ))?
        };
        let mut word = 0i64;
        for i in 0..subscriptions.len() {
            if i % 64 == 0 {
                word = self.out.raw_get(i / 64 + 1)?;
            }
            verdicts.push(Ok(word & (1 << (i % 64)) != 0));
        }
        if failed > 0 {
            let first = verdicts.len() - subscriptions.len();
            let mut out_of_memory = false;
            for pair in self.errors.pairs::<usize, Value>() {
                let (i, error) = pair?;
                let message = match error {
                    Value::Error(error) => {
                        out_of_memory |= is_memory_error(&error);
                        lua_error(*error)
                    }
                    Value::String(message) => {
                        let message = message.to_string_lossy();
                        if message == "not enough memory" {
                            out_of_memory = true;
                            format!("memory limit reached: {message}")
                        } else {
                            message
                        }
                    }
                    other => format!("the filter raised a {} as its error", other.type_name()),
                };
                if let Some(slot) = verdicts.get_mut(first + i - 1) {
                    *slot = Err(EvalError::Runtime(message));
                }
            }
            self.errors = self.lua.create_table()?;
            if out_of_memory {
                // Give the memory back (cached contexts included) before the next
                // call, so one greedy filter cannot wedge the state.
                self.drop_contexts();
            }
        }
        Ok(())
    }
}

/// Converts decoded JSON into Lua values (objects and arrays become tables).
fn json_to_lua(lua: &Lua, value: &serde_json::Value, depth: usize) -> mlua::Result<Value> {
    if depth > MAX_JSON_DEPTH {
        return Err(mlua::Error::runtime("payload JSON nests too deeply"));
    }
    Ok(match value {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(lua.create_string(s)?),
        serde_json::Value::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                table.raw_set(i + 1, json_to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(table)
        }
        serde_json::Value::Object(fields) => {
            let table = lua.create_table_with_capacity(0, fields.len())?;
            for (key, item) in fields {
                table.raw_set(key.as_str(), json_to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(table)
        }
    })
}
